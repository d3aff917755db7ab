"""Reference computations with Hugging Face transformers, used by quill's tests and benchmarks.

Subcommands:
  fixtures OUT_DIR                       random Qwen2 checkpoints + recorded logits/greedy tokens
  logits MODEL_DIR INPUT_JSON OUT_FILE   logits of a saved checkpoint for given token rows
  bench-generate ...                     time transformers' generate() (see --help)
"""

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    StoppingCriteria,
    StoppingCriteriaList,
)

VOCAB = 320
GREEDY_NEW_TOKENS = 512
PROMPT_LENGTHS = (5, 11, 17)
MIN_MARGIN = 2e-4

VARIANTS = {
    "tied_gqa_single": dict(tie_word_embeddings=True, num_key_value_heads=2, shard=None),
    "untied_mha_sharded": dict(tie_word_embeddings=False, num_key_value_heads=4, shard="100KB"),
}


def make_config(tied, kv_heads, **extra):
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        initializer_range=0.25,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        attn_implementation="eager",
        **extra,
    )


def randomise(model):
    """Non-trivial biases and norm weights, so that loading them is really tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))


def greedy(model, prompt, new_tokens):
    """Greedy continuation with the smallest top-1/top-2 logit gap seen along the way."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):]
    margin = min(float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores)
    return tokens, margin


def fixtures(out_dir):
    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    for name, spec in VARIANTS.items():
        cfg = make_config(spec["tie_word_embeddings"], spec["num_key_value_heads"])
        model = Qwen2ForCausalLM(cfg).eval()
        randomise(model)
        model_dir = os.path.join(out_dir, name)
        kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
        model.save_pretrained(model_dir, **kwargs)
        record = {}
        ids = torch.randint(1, VOCAB, (2, 24))
        with torch.no_grad():
            record["logits_input"] = ids
            record["logits"] = model(ids).logits.float().contiguous()
            for i, length in enumerate(PROMPT_LENGTHS):
                for _attempt in range(50):
                    prompt = torch.randint(1, VOCAB, (length,)).tolist()
                    tokens, margin = greedy(model, prompt, GREEDY_NEW_TOKENS)
                    if margin >= MIN_MARGIN:
                        break
                else:
                    sys.exit(f"{name}: no prompt of length {length} without near-ties")
                record[f"prompt_{i}"] = torch.tensor(prompt)
                record[f"greedy_{i}"] = tokens.contiguous()
        save_file(record, os.path.join(out_dir, f"{name}.expected.safetensors"))

    cfg = make_config(True, 2, num_labels=1)
    cfg.architectures = ["Qwen2ForSequenceClassification"]
    rm = Qwen2ForSequenceClassification(cfg).eval()
    randomise(rm)
    rm.save_pretrained(os.path.join(out_dir, "reward_model"))
    rows = [torch.randint(1, VOCAB, (n,)).tolist() for n in (9, 16, 5)]
    rows[1][-1] = 0  # ends in a pad token: pooled at the token before it, as transformers does
    width = max(len(r) for r in rows)
    padded = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        scores = rm(padded).logits.float().contiguous()
    record = {f"row_{i}": torch.tensor(r) for i, r in enumerate(rows)}
    record["scores"] = scores
    save_file(record, os.path.join(out_dir, "reward_model.expected.safetensors"))


def logits(model_dir, input_json, out_file):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with open(input_json) as f:
        ids = torch.tensor(json.load(f))
    with torch.no_grad():
        out = model(ids).logits.float().contiguous()
    save_file({"logits": out}, out_file)


class PerRowLength(StoppingCriteria):
    """Stops row i after lengths[i] new tokens (transformers keeps computing finished rows)."""

    def __init__(self, prompt_len, lengths):
        self.prompt_len = prompt_len
        self.lengths = torch.tensor(lengths)

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.prompt_len) >= self.lengths


def bench_generate(args):
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with open(args.requests) as f:
        spec = json.load(f)
    prompts, lengths = spec["prompts"], spec["lengths"]
    prompt_len = len(prompts[0])
    assert all(len(p) == prompt_len for p in prompts), "benchmark prompts share one length"
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(prompts), args.batch):
        ids = torch.tensor(prompts[b : b + args.batch])
        rows = lengths[b : b + args.batch]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max(rows),
            stopping_criteria=StoppingCriteriaList([PerRowLength(prompt_len, rows)]),
            eos_token_id=None,
            pad_token_id=0,
        )
        tokens += sum(rows)
        assert out.shape[1] - prompt_len == max(rows)
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens": tokens, "seconds": seconds}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fixtures")
    p.add_argument("out_dir")
    p = sub.add_parser("logits")
    p.add_argument("model_dir")
    p.add_argument("input_json")
    p.add_argument("out_file")
    p = sub.add_parser("bench-generate", help="time generate() on requests from a JSON file")
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True, help='JSON {"prompts": [[ids]], "lengths": [n]}')
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()
    if args.command == "fixtures":
        fixtures(args.out_dir)
    elif args.command == "logits":
        logits(args.model_dir, args.input_json, args.out_file)
    else:
        bench_generate(args)


if __name__ == "__main__":
    main()
