"""Reference computations with Hugging Face transformers, used by quill's tests and benchmarks.

Subcommands:
  fixtures OUT_DIR                       random Qwen2 checkpoints + recorded logits/greedy tokens
  logits MODEL_DIR INPUT_JSON OUT_FILE   logits of a saved checkpoint for given token rows
  reward-model OUT TOKENIZER TEXTS OUT   a random reward model and its scores of texts
  bench-generate ...                     time transformers' generate() (see --help)
  grpo-step MODEL_DIR BATCH_JSON OUT_FILE [--float64 | --autocast-bf16] [--grads]
                                         GRPO + AdamW steps from a checkpoint, weights after
"""

import argparse
import json
import os
import shutil
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


def response_logprobs(model, batch, temperature):
    """log_softmax(logits / T) of every next token, with masks of response tokens.

    Rows are prompt + response, right-padded; column t holds the log-prob of token t + 1."""
    rows = [s["prompt"] + s["response"] for s in batch]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    response = torch.zeros(len(rows), width, dtype=torch.bool)
    behaviour = torch.zeros(len(rows), width)
    for i, (s, row) in enumerate(zip(batch, rows)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        response[i, len(s["prompt"]) : len(row)] = True
        behaviour[i, len(s["prompt"]) : len(row)] = torch.tensor(s["behaviour_logprobs"])
    logits = model(input_ids=ids, attention_mask=attention).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp, response[:, 1:].float(), behaviour[:, 1:]


def kl_penalty(logp, ref_logp, estimator):
    """Schulman's k1/k2/k3 estimators of KL(policy || reference) per token."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(model, reference, batch, cfg):
    """The GRPO objective: PPO-clip on importance ratios against the behaviour policy, or
    (with tis_cap) a one-update PPO step against the learner's own policy with verl's
    truncated importance weight on the behaviour mismatch; plus a KL penalty."""
    logp, mask, behaviour = response_logprobs(model, batch, cfg["temperature"])
    adv = torch.tensor([s["advantage"] for s in batch])[:, None]
    low, high = 1 - cfg["eps_low"], 1 + cfg["eps_high"]
    if cfg["tis_cap"] is None:
        ratio = torch.exp(logp - behaviour)
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, low, high) * adv)
    else:
        old_logp = logp.detach()
        ratio = torch.exp(logp - old_logp)
        tis_weight = torch.clamp(torch.exp(old_logp - behaviour), max=cfg["tis_cap"])
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, low, high) * adv) * tis_weight
    if cfg["kl_coef"] > 0:
        with torch.no_grad():
            ref_logp, _, _ = response_logprobs(reference, batch, cfg["temperature"])
        per_token = per_token + cfg["kl_coef"] * kl_penalty(logp, ref_logp, cfg["kl_estimator"])
    per_token = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if cfg["aggregation"] == "token_mean":
        return per_token.sum() / mask.sum()
    assert cfg["aggregation"] == "sequence_mean", cfg["aggregation"]
    return (per_token.sum(-1) / mask.sum(-1)).mean()


def grpo_step(model_dir, batch_json, out_file, dtype, autocast=False, grads=False):
    """Runs the steps of BATCH_JSON in `dtype`; float64 gives the exact result that float32
    implementations are judged against. With `autocast` the forward pass runs under
    torch.autocast("cpu", dtype=torch.bfloat16) (f32 parameters and optimizer, bf16
    matmuls, f32 log-softmax and loss); with `grads` the first step's gradients (before
    clipping) are written too, as `grad.<name>`."""
    with open(batch_json) as f:
        spec = json.load(f)
    cfg, opt_cfg = spec["grpo"], spec["optimizer"]
    assert opt_cfg["schedule"] == {"warmup_constant": {"warmup_steps": 0}}, "constant lr only"

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")

    model = load().train()
    reference = load().eval().requires_grad_(False) if cfg["kl_coef"] > 0 else None
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=opt_cfg["lr"],
        betas=(opt_cfg["beta1"], opt_cfg["beta2"]),
        eps=opt_cfg["eps"],
        weight_decay=opt_cfg["weight_decay"],
        foreach=False,
    )
    out = {}
    for k, batch in enumerate(spec["steps"]):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = grpo_loss(model, reference, batch, cfg)
        loss = loss.float() if autocast else loss
        loss.backward()
        if grads and k == 0:
            for name, p in model.named_parameters():
                out[f"grad.{name}"] = p.grad.detach().clone().contiguous()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg["max_grad_norm"])
        optimizer.step()
        out[f"stats.loss.{k}"] = loss.detach().reshape(1)
        out[f"stats.grad_norm.{k}"] = norm.detach().reshape(1)
    for name, p in model.named_parameters():
        out[name] = p.detach().contiguous()
    save_file(out, out_file)


def reward_model(out_dir, tokenizer_json, texts_json, scores_out):
    """A random sequence-classification reward model over a given tokenizer, saved with it,
    and its scores of the texts, each scored on its own (no padding)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_json)
    torch.manual_seed(1)
    cfg = make_config(True, 2, num_labels=1)
    cfg.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    cfg.architectures = ["Qwen2ForSequenceClassification"]
    rm = Qwen2ForSequenceClassification(cfg).eval()
    randomise(rm)
    rm.save_pretrained(out_dir)
    shutil.copy(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
    with open(texts_json) as f:
        texts = json.load(f)
    with torch.no_grad():
        scores = [float(rm(torch.tensor([tokenizer.encode(t).ids])).logits[0, 0]) for t in texts]
    save_file({"scores": torch.tensor(scores)}, scores_out)


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
    p = sub.add_parser("grpo-step", help="GRPO + AdamW steps on batches from a JSON file")
    p.add_argument("model_dir")
    p.add_argument("batch_json")
    p.add_argument("out_file")
    p.add_argument("--float64", action="store_true", help="compute in float64 instead of float32")
    p.add_argument("--autocast-bf16", action="store_true", help="run the loss under bf16 autocast")
    p.add_argument("--grads", action="store_true", help="also write the first step's gradients")
    p = sub.add_parser("reward-model", help="a random reward model and its scores of texts")
    p.add_argument("out_dir")
    p.add_argument("tokenizer_json")
    p.add_argument("texts_json")
    p.add_argument("scores_out")
    args = parser.parse_args()
    if args.command == "fixtures":
        fixtures(args.out_dir)
    elif args.command == "logits":
        logits(args.model_dir, args.input_json, args.out_file)
    elif args.command == "reward-model":
        reward_model(args.out_dir, args.tokenizer_json, args.texts_json, args.scores_out)
    elif args.command == "grpo-step":
        dtype = torch.float64 if args.float64 else torch.float32
        grpo_step(args.model_dir, args.batch_json, args.out_file, dtype, args.autocast_bf16, args.grads)
    else:
        bench_generate(args)


if __name__ == "__main__":
    main()
