"""The PyTorch side of `quill bench train`: the same GRPO step (PPO-clip on importance
ratios, token-mean loss, global-norm clipping, AdamW) on the same model, batch and
thread count, timed per step; prints one JSON line with the seconds per step, the
process's peak RSS and the bytes of AdamW's state and of the gradients."""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def loss_of(model, batch, cfg):
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
    logits = model(input_ids=ids, attention_mask=attention).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / cfg["temperature"], dim=-1)
    logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask, behaviour = response[:, 1:], behaviour[:, 1:]
    adv = torch.tensor([s["advantage"] for s in batch])[:, None]
    ratio = torch.exp(logp - behaviour)
    clipped = torch.clamp(ratio, 1 - cfg["eps_low"], 1 + cfg["eps_high"])
    per_token = -torch.min(ratio * adv, clipped * adv)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return per_token.sum() / mask.sum()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", required=True, help="JSON: grpo, optimizer, samples")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.batch) as f:
        spec = json.load(f)
    cfg, opt = spec["grpo"], spec["optimizer"]
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    ).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=opt["lr"],
        betas=(opt["beta1"], opt["beta2"]),
        eps=opt["eps"],
        weight_decay=opt["weight_decay"],
    )
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        loss = loss_of(model, spec["samples"], cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt["max_grad_norm"])
        optimizer.step()
        if step > 0:
            times.append(time.perf_counter() - started)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    print(
        json.dumps(
            {
                "seconds_per_step": statistics.median(times),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "optimizer_bytes": size(state),
                "gradient_bytes": size(grads),
            }
        )
    )


if __name__ == "__main__":
    main()
