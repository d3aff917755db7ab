"""The Python side of `quill bench rl`: TRL's GRPOTrainer on quill's task, an evaluator
shared by both systems, and quill's length reward through its Python port
(length_reward.py, checked against the Rust crate by tests/reward_port.rs).

Every subcommand prints one JSON object as the last line of stdout; logs (TRL's and
transformers' included) go to stderr. Bad input exits with status 2 and a message on
stderr naming the file, line and field.

    rl_bench.py make-model --seed S --tokenizer-dir D --out DIR
        A fresh random Qwen2ForCausalLM (torch.manual_seed(S)) with D/config.json's
        config (D is what `quill init-model --out D` writes; its weights are not read),
        saved as a Hugging Face folder that quill loads: config.json, model.safetensors
        (f32) and D's tokenizer files (tokenizer.json, tokenizer_config.json).
        Prints {"out": DIR}.

    rl_bench.py reward --fixtures FILE
        FILE: JSON lines {"response": str, "lo": int, "hi": int, "l_max": int}, a whole
        response as quill's reward worker reads it. Prints {"rewards": [float, ...]},
        response_length_reward(response, [lo, hi], l_max) per line, in order.

    rl_bench.py trl --model DIR --prompts FILE --out DIR --group-size G
            --prompts-per-step P --max-new-tokens N --temperature T --lr LR --steps S
            --threads K --seed SEED [--l-max L]
        FILE: JSON lines {"prompt": str, "lo": int, "hi": int}, each prompt the full
        text ending in `<answer>`. Trains DIR with TRL's GRPOTrainer on CPU (K torch
        threads): S optimiser steps of P prompts x G completions each (one generation
        and one optimiser step per step, no gradient accumulation), at most N new tokens
        sampled at temperature T (top-p 1, top-k off), constant learning rate LR without
        warm-up, no KL (beta 0), TRL's defaults otherwise (token-level clipping at 0.2,
        loss averaged over the step's tokens, rewards normalised within each group), and
        quill's optimiser defaults (AdamW, betas 0.9/0.999, eps 1e-8, weight decay 0.01,
        gradient norm clipped to 1). The reward is `score` below. Appends one line per
        step to OUT/steps.jsonl:
            {"step": int, "elapsed_s": float (wall clock since training began),
             "reward_mean": float, "in_range_share": float,
             "completion_tokens": int (tokens generated this step, stop tokens included)}
        saves the final policy to OUT/final (as make-model saves) and prints
        {"steps": S, "wall_s": float (the training loop: generation, scoring and
        optimisation, not loading or saving), "final": "OUT/final"}.

    rl_bench.py evaluate --model DIR --prompts FILE --samples N --max-new-tokens M
            --temperature T --seed SEED --threads K [--l-max L]
        Samples N completions per prompt of FILE (as for trl) with transformers'
        generate (temperature T, top-p 1, top-k off, at most M new tokens, seeded with
        torch.manual_seed(SEED)) and scores them with `score`. Prints
        {"reward_mean": float, "in_range_share": float, "samples": int}, where
        in_range_share is the share of samples with a complete answer whose effective
        word count is in [lo, hi] (the `in_range` of quill's reward worker).

--l-max defaults to 400, the `rewards.l_max` of configs/default.toml.

How a completion is scored, so that TRL gets exactly the reward quill would give it:
quill's reward worker scores `template.response_prefix + generated text`, where the text
is the decoded tokens with special tokens kept, up to and including the stop that ended
them. The bench's prompts end in the response prefix that opens the answer, so `score`
reads `QUILL_RESPONSE_PREFIX + completion` (the prefix of configs/default.toml); since
that prefix holds a complete think block followed by `<answer>`, the answer is the
completion up to its first `</answer>`, and a completion without `</answer>` (cut at
N tokens, or ended by `<|endoftext|>`) scores 0. A quill job compared with this must
use that response_prefix (or any prefix ending in a complete think block and
`<answer>`). Completions are decoded with the raw tokenizer.json tokenizer (the
`tokenizers` library quill also uses), not with TRL's skip_special_tokens=True text,
which drops `</answer>`.

Stops: generation ends at the tokens of quill's default stop strings (`<|user|>`,
`<|endoftext|>`, `</answer>`: single special tokens in quill's tokenizer), given to TRL
and generate as end-of-sequence ids; TRL masks everything after the first of them. Unlike
quill's engine, neither stops on the same text spelled out in ordinary tokens.
"""

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ next to the sources
from length_reward import (  # noqa: E402
    InvalidRange,
    LengthRange,
    effective_word_count,
    response_length_reward,
    split_response,
)

QUILL_RESPONSE_PREFIX = " <think> </think><answer>"
STOP_STRINGS = ("<|user|>", "<|endoftext|>", "</answer>")
DEFAULT_L_MAX = 400


class BadInput(Exception):
    pass


def read_jsonl(path, fields, check=lambda record: None):
    """The records of a JSON-lines file (blank lines skipped), each checked to have
    `fields` (name -> type), a valid range when it has `lo` and `hi`, and no problem that
    `check` names."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{where}: not JSON: {e}") from None
            if not isinstance(record, dict):
                raise BadInput(f"{where}: not a JSON object")
            for name, kind in fields.items():
                if name not in record:
                    raise BadInput(f"{where}: missing field `{name}`")
                value = record[name]
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise BadInput(f"{where}: field `{name}` must be {kind.__name__}, got {value!r}")
            if "lo" in fields:
                try:
                    record["range"] = LengthRange(record["lo"], record["hi"])
                except InvalidRange as e:
                    raise BadInput(f"{where}: fields `lo`/`hi`: {e}") from None
            problem = check(record)
            if problem:
                raise BadInput(f"{where}: {problem}")
            records.append(record)
    if not records:
        raise BadInput(f"{path}: no records")
    return records


def read_prompts(path):
    def opens_the_answer(record):
        return None if record["prompt"].endswith("<answer>") else "field `prompt` must end in `<answer>`"

    return read_jsonl(path, {"prompt": str, "lo": int, "hi": int}, opens_the_answer)


def score(completion, length_range, l_max):
    """(length reward, in range) of a completion of a prompt that opened the answer."""
    response = QUILL_RESPONSE_PREFIX + completion
    answer = split_response(response)[1]
    in_range = answer is not None and length_range.lo <= effective_word_count(answer) <= length_range.hi
    return response_length_reward(response, length_range, l_max), in_range


def load_tokenizer(model_dir):
    """The folder's tokenizer.json as is. (AutoTokenizer picks Qwen2Tokenizer for this
    folder, which NFC-normalises and pre-tokenises its own way, unlike quill.)"""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def stop_ids(tokenizer):
    ids = (tokenizer.backend_tokenizer.token_to_id(s) for s in STOP_STRINGS)
    return [i for i in ids if i is not None]


def save_hf(model, tokenizer_dir, out):
    """`model` as safetensors plus the tokenizer files of `tokenizer_dir`, into `out`."""
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).glob("tokenizer*"):
        shutil.copy(f, out)


def make_model(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.tokenizer_dir)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_hf(model, args.tokenizer_dir, args.out)
    return {"out": args.out}


def reward(args):
    records = read_jsonl(args.fixtures, {"response": str, "lo": int, "hi": int, "l_max": int})
    return {"rewards": [response_length_reward(r["response"], r["range"], r["l_max"]) for r in records]}


def trl(args):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    prompts = read_prompts(args.prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.generation_config.eos_token_id = stop_ids(tokenizer)
    decode = tokenizer.backend_tokenizer.decode
    batch = {}  # what the reward function saw this step, for the step log

    def length_reward(completion_ids, lo, hi, **_):
        scores = [
            score(decode(ids, skip_special_tokens=False), LengthRange(l, h), args.l_max)
            for ids, l, h in zip(completion_ids, lo, hi)
        ]
        batch["scores"] = scores
        batch["tokens"] = sum(len(ids) for ids in completion_ids)
        return [r for r, _ in scores]

    class StepLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            scores = batch.pop("scores")
            line = {
                "step": state.global_step,
                "elapsed_s": time.perf_counter() - self.start,
                "reward_mean": sum(r for r, _ in scores) / len(scores),
                "in_range_share": sum(ok for _, ok in scores) / len(scores),
                "completion_tokens": batch.pop("tokens"),
            }
            with open(out / "steps.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")

    config = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.group_size,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",
        use_vllm=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    dataset = Dataset.from_list([{"prompt": p["prompt"], "lo": p["lo"], "hi": p["hi"]} for p in prompts])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepLog()],
    )
    (out / "steps.jsonl").unlink(missing_ok=True)
    started = time.perf_counter()
    trainer.train()
    wall_s = time.perf_counter() - started
    final = out / "final"
    save_hf(trainer.model, args.model, final)
    return {"steps": trainer.state.global_step, "wall_s": wall_s, "final": str(final)}


def evaluate(args):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    prompts = read_prompts(args.prompts)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    stops = stop_ids(tokenizer)
    generation = GenerationConfig(
        do_sample=True,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=args.max_new_tokens,
        num_return_sequences=args.samples,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
    )
    backend = tokenizer.backend_tokenizer
    torch.manual_seed(args.seed)
    scores = []
    for p in prompts:
        ids = torch.tensor([backend.encode(p["prompt"], add_special_tokens=False).ids])
        with torch.no_grad():
            sequences = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation)
        for sequence in sequences[:, ids.shape[1] :].tolist():
            end = next((i + 1 for i, t in enumerate(sequence) if t in stops), len(sequence))
            text = backend.decode(sequence[:end], skip_special_tokens=False)
            scores.append(score(text, p["range"], args.l_max))
    return {
        "reward_mean": sum(r for r, _ in scores) / len(scores),
        "in_range_share": sum(ok for _, ok in scores) / len(scores),
        "samples": len(scores),
    }


def parser():
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="a random tiny Qwen2 with quill's default config")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=make_model)

    p = sub.add_parser("reward", help="the length reward port on fixtures")
    p.add_argument("--fixtures", required=True)
    p.set_defaults(run=reward)

    p = sub.add_parser("trl", help="train with TRL's GRPOTrainer")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--prompts-per-step", type=int, required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--l-max", type=int, default=DEFAULT_L_MAX)
    p.set_defaults(run=trl)

    p = sub.add_parser("evaluate", help="sample a checkpoint and score it")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--l-max", type=int, default=DEFAULT_L_MAX)
    p.set_defaults(run=evaluate)
    return top


def main():
    args = parser().parse_args()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = args.run(args)
    except (BadInput, OSError) as e:
        print(f"rl_bench.py {args.command}: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
