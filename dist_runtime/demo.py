"""`dist-runtime demo`: the whole path on a tiny model, on 4 CPU ranks (TP=2 x PP=2)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from dist_runtime.config import ModelConfig
from dist_runtime.llm import LLM
from dist_runtime.plan_report import format_plan
from dist_runtime.presets import preset_config
from dist_runtime.sampling_params import SamplingParams
from sharding.builder import build_engine
from sharding.planner import make_plan
from sharding.synth import write_checkpoint

PROMPTS = ["Hello, world!", "The quick brown fox", "Once upon a time"]
PLAN = dict(max_batch_size=8, max_seq_len=256)


def run_demo(out: str | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="dist-runtime-demo-") as tmp:
        root = Path(out or tmp)
        start = time.perf_counter()
        ckpt = write_checkpoint(preset_config("tiny", "llama"), root / "ckpt", progress=False)
        print(f"[1/4] synth: tiny Llama checkpoint (random weights) in {ckpt}\n")
        config = ModelConfig.from_dir(ckpt)
        print("[2/4] plan: tp=2 x pp=2\n" + format_plan(config, make_plan(config, 2, 2, "fp32", **PLAN), None,
                                                       "tiny") + "\n")
        engine = build_engine(ckpt, root / "engine", 2, 2, "fp32", progress=False, **PLAN)
        print(f"[3/4] build: {len(engine.files)} rank files in {engine.path}\n")
        print("[4/4] generate on 4 spawned CPU ranks (greedy, 16 tokens):")
        with LLM(str(engine.path)) as llm:
            for o in llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0)):
                print(f"  {o.prompt!r} -> {o.text!r} ({len(o.token_ids)} tokens, {o.finish_reason})")
        print(f"\ndone in {time.perf_counter() - start:.1f} s (random weights: the text is noise, "
              "the tokens equal Hugging Face transformers')")
    return 0
