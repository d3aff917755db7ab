"""Independent PyTorch/transformers references for `quill train-rm`, used by its tests.

Subcommands:
  bt-step MODEL_DIR PAIRS_JSON OUT_FILE   one Bradley-Terry AdamW update of a saved reward
                                          model on token-id pairs; writes the weights after
                                          the update and the batch loss
  score MODEL_DIR TEXTS_JSON OUT_JSON     scores of texts by a saved reward model, loaded with
                                          AutoModelForSequenceClassification and its tokenizer
"""

import argparse
import json

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast


def padded(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def bt_step(model_dir, pairs_json, out_file):
    """PAIRS_JSON: {"chosen": [[ids]], "rejected": [[ids]], "lr", "weight_decay",
    "max_grad_norm"}. The whole batch in one forward pass: the loss is the mean over pairs
    of -log sigmoid(r_chosen - r_rejected); torch.optim.AdamW with its default betas/eps."""
    with open(pairs_json) as f:
        spec = json.load(f)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    pad = model.config.pad_token_id
    rows = spec["chosen"] + spec["rejected"]
    ids, mask = padded(rows, pad)
    scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    n = len(spec["chosen"])
    loss = -F.logsigmoid(scores[:n] - scores[n:]).mean()
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, spec["max_grad_norm"])
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"])
    opt.step()
    out = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out["__loss__"] = loss.detach().reshape(1)
    out["__grad_norm__"] = grad_norm.detach().reshape(1)
    save_file(out, out_file)


def score(model_dir, texts_json, out_json):
    with open(texts_json) as f:
        texts = json.load(f)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    scores = []
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    with open(out_json, "w") as f:
        json.dump(scores, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bt-step")
    p.add_argument("model_dir")
    p.add_argument("pairs_json")
    p.add_argument("out_file")
    p = sub.add_parser("score")
    p.add_argument("model_dir")
    p.add_argument("texts_json")
    p.add_argument("out_json")
    args = parser.parse_args()
    if args.cmd == "bt-step":
        bt_step(args.model_dir, args.pairs_json, args.out_file)
    else:
        score(args.model_dir, args.texts_json, args.out_json)


if __name__ == "__main__":
    main()
