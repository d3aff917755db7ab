"""The PyTorch side of `quill bench train`: the same GRPO step (PPO-clip on importance
ratios, token-mean loss, global-norm clipping, AdamW) on the same model, batch and
thread count, timed per step; prints one JSON line with the seconds per step, the peak
RSS and the bytes of AdamW's state and of the gradients (per rank).

With `--world K > 1` it runs K processes over gloo, each training its share of the
batch (sample i on rank i mod K) with the model wrapped by FSDP2 (`fully_shard` on every
decoder layer and on the model): `--reshard` frees each layer's gathered weights after
its forward pass (FULL_SHARD, ZeRO-3), without it they stay gathered until the backward
pass (SHARD_GRAD_OP, ZeRO-2). The figures are rank 0's time and the largest rank's
bytes and RSS."""

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def local(t):
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def train(rank, world, args, spec):
    """Trains `args.steps` timed steps (after a warm-up) on this rank; returns the figures."""
    torch.set_num_threads(args.threads)
    cfg, opt = spec["grpo"], spec["optimizer"]
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    ).train()
    samples = spec["samples"]
    global_tokens = sum(len(s["response"]) for s in samples)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, reshard_after_forward=args.reshard)
        fully_shard(model, reshard_after_forward=args.reshard)
        samples = samples[rank::world]
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=opt["lr"],
        betas=(opt["beta1"], opt["beta2"]),
        eps=opt["eps"],
        weight_decay=opt["weight_decay"],
    )
    # The loss of this rank's samples over the global batch's tokens; FSDP averages the
    # ranks' gradients, so it is scaled by K to give the global batch's gradient.
    scale = world * sum(len(s["response"]) for s in samples) / global_tokens
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        loss = loss_of(model, samples, cfg) * scale
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt["max_grad_norm"])
        optimizer.step()
        if step > 0:
            times.append(time.perf_counter() - started)
    state = [
        local(t)
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    ]
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    return {
        "seconds_per_step": statistics.median(times),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "optimizer_bytes": size(state),
        "gradient_bytes": size(grads),
    }


def rank_main(rank, world, port, args, spec, out_dir):
    """One FSDP rank: joins the gloo group, trains, writes its figures."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        figures = train(rank, world, args, spec)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(figures, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", required=True, help="JSON: grpo, optimizer, samples")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--world", type=int, default=1, help="FSDP ranks (processes)")
    parser.add_argument(
        "--reshard", action="store_true", help="free gathered weights after forward (ZeRO-3)"
    )
    args = parser.parse_args()
    with open(args.batch) as f:
        spec = json.load(f)
    if args.world == 1:
        print(json.dumps(train(0, 1, args, spec)))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(rank_main, args=(args.world, port, args, spec, out_dir), nprocs=args.world)
        ranks = []
        for rank in range(args.world):
            with open(os.path.join(out_dir, f"rank-{rank}.json")) as f:
                ranks.append(json.load(f))
    figures = dict(ranks[0])
    for key in ("peak_rss_bytes", "optimizer_bytes", "gradient_bytes"):
        figures[key] = max(r[key] for r in ranks)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
