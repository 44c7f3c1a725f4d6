"""The kernel choices an engine was tuned with (engine.json's "tuning"), as the runner reads them.

The build times the candidates on its GPU (sharding/autotune.py) and records, per shape, the
winner and the measured times. Choices are keyed by batch-size bucket: a step of n sequences
(or n tokens) takes the choice of the smallest tuned bucket that holds it, so the CUDA graph
of each bucket bakes in its own kernels and eager steps choose the same way. A GPU runner
hands one KernelChoices to every layer that has a `kernels` attribute; on the CPU there is none.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dist_runtime.engine import TuningRecord


def skipped(reason: str) -> TuningRecord:
    """engine.json's record of a build that did not tune."""
    return TuningRecord(False, reason)


def _by_bucket(table: dict[str, Any]) -> list[tuple[int, Any]]:
    return sorted((int(bucket), choice) for bucket, choice in table.items())


def _pick(table: list[tuple[int, Any]], n: int, past_largest: Any) -> Any:
    """The choice of the smallest bucket >= n; `past_largest` past the largest."""
    for bucket, choice in table:
        if n <= bucket:
            return choice
    return past_largest


class KernelChoices:
    """Lookups over a tuning record: attention launch parameters by decode batch size, the
    prefill attention's launch, and the GEMM kernel by (rows, out features, in features)."""

    def __init__(self, record: TuningRecord) -> None:
        self.record = record
        self._attention = _by_bucket(record.decode_attention or {})
        self._gemm = {shape: _by_bucket(table) for shape, table in (record.gemm or {}).items()}

    @classmethod
    def from_record(cls, record: TuningRecord | None) -> KernelChoices | None:
        return cls(record) if record and record.tuned else None

    def attention(self, num_seqs: int, short_context_launch: bool = False) -> dict[str, int]:
        """Keyword arguments of paged_decode_attention: splits, block_n, num_warps, and vector,
        f16, convert_on_load, fp8_products or num_stages where the tuning picked that variant.
        `short_context_launch`: every context is within short_context(num_seqs), and that launch
        is wanted."""
        if not self._attention:
            return {}
        choice = self._attention_choice(num_seqs)
        if short_context_launch and "short" in choice:
            choice = choice["short"]
        keys = ("splits", "block_n", "num_warps", "vector", "f16", "convert_on_load", "fp8_products", "num_stages")
        return {key: choice[key] for key in keys if key in choice}

    def short_context(self, num_seqs: int) -> int:
        """The longest context for which a decode step of `num_seqs` sequences has a launch of
        its own (the tuning's short context, where another launch won clearly); 0 if none."""
        if not self._attention:
            return 0
        return self._attention_choice(num_seqs).get("short", {}).get("context", 0)

    def _attention_choice(self, num_seqs: int) -> dict[str, Any]:
        """The tuning's record for the bucket of `num_seqs` (past the largest, the largest's)."""
        return _pick(self._attention, num_seqs, self._attention[-1][1])

    def gemm(self, rows: int, out_features: int, in_features: int) -> dict[str, int] | None:
        """skinny_linear's keyword arguments where the Triton kernel won, else None (cuBLAS)."""
        table = self._gemm.get(gemm_key(out_features, in_features))
        choice = _pick(table, rows, None) if table else None
        if choice is None or choice["kernel"] != "triton":
            return None
        return {key: choice[key] for key in ("block_n", "block_k", "num_warps", "num_stages")}

    def prefill(self) -> tuple[int, int, int, int] | None:
        """The prefill kernel's launch (BLOCK_M, BLOCK_N, num_warps, num_stages) the tuning
        picked; None where it timed none (float32 engines, older builds): launch_for's."""
        choice = self.record.prefill_attention
        return tuple(choice["launch"]) if choice else None

    def fast_accumulate(self, rows: int, out_features: int, in_features: int) -> bool:
        """Whether an fp8 _scaled_mm of this shape accumulates fast: where the tuning found
        that faster for the bucket of `rows` (past the largest bucket, the largest's choice)."""
        table = self._gemm.get(gemm_key(out_features, in_features))
        if not table:
            return False
        return _pick(table, rows, table[-1][1]).get("fast_accumulate", False)


def install(model: nn.Module, choices: KernelChoices | None) -> None:
    """Hand `choices` (None: the defaults) to every layer of `model` that launches a tuned kernel."""
    for module in model.modules():
        if hasattr(module, "kernels"):
            module.kernels = choices


def gemm_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


def summary(record: TuningRecord | None) -> str:
    """One line for `build`'s output: what was tuned, or why nothing was."""
    if not record or not record.tuned:
        return f"kernel tuning skipped: {record.reason if record else 'no record'}"
    splits = ", ".join(f"{b}: {c['splits']}" for b, c in _by_bucket(record.decode_attention))
    gemms = [c for table in record.gemm.values() for c in table.values()]
    raced = [c for c in gemms if "best_triton_us" in c]
    triton = sum(c["kernel"] == "triton" for c in raced)
    when = f"in {record.seconds} s" if record.reused_from is None else f"(reused from {record.reused_from})"
    line = (f"kernels tuned on {record.gpu} {when}: decode-attention splits by batch "
            f"{{{splits}}}; Triton GEMM faster than cuBLAS for {triton} of {len(raced)} (shape, rows) cases")
    fp8 = [c for c in gemms if "cublas_fast_us" in c]
    if fp8:
        line += f"; fp8 GEMMs accumulate fast in {sum(c.get('fast_accumulate', False) for c in fp8)} of {len(fp8)}"
    if record.prefill_attention is not None:
        prefill = record.prefill_attention
        line += (f"; prefill attention {tuple(prefill['launch'])} (BLOCK_M, BLOCK_N, warps, stages), "
                 f"{prefill['us']} us against the default's {prefill['default_us']} us for {prefill['tokens']} tokens")
    return line
