"""A Step is everything every rank needs to run one forward pass in lockstep, as flat arrays:
rank 0 builds it, the control plane ships it, and a rank's ModelRunner is a function of
(Step, its weights, its KV cache).

Sequence i's new tokens are `token_ids[query_start[i]:query_start[i + 1]]`. Only the
sequences in `sample_rows` (those whose step reaches their last token) get logits and a
sampled token; the per-row arrays below are indexed by position in `sample_rows`.

A step launched before the previous step's sampled ids reach rank 0's host (the overlap) names
where its decoding sequences' input tokens are instead: `prev_rows`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass
class Step:
    token_ids: np.ndarray  # int64 [tokens]
    positions: np.ndarray  # int64 [tokens]
    slot_mapping: np.ndarray  # int64 [tokens]: KV-cache slot each token writes
    query_start: np.ndarray  # int64 [seqs + 1]
    context_lens: np.ndarray  # int64 [seqs]: cached tokens after this step
    block_tables: np.ndarray  # int32 [seqs, max_blocks], padded with 0
    sample_rows: np.ndarray  # int64 [rows]: which sequences sample
    temperature: np.ndarray  # float32 [rows]; 0 is greedy
    top_k: np.ndarray  # int64 [rows]; 0 is off
    top_p: np.ndarray  # float32 [rows]; 1 is off
    min_p: np.ndarray  # float32 [rows]; 0 is off
    seeds: np.ndarray  # int64 [rows]
    sample_index: np.ndarray  # int64 [rows]: tokens the sequence generated before this one
    num_logprobs: np.ndarray  # int64 [rows]: top-N log-probabilities wanted; -1 for none
    penalties: np.ndarray  # float32 [rows, 3]: repetition, presence, frequency
    history: np.ndarray  # int64: prompt + output tokens of penalised rows, concatenated
    history_start: np.ndarray  # int64 [rows + 1]: each row's slice of `history` (empty if unpenalised)
    history_prompt_len: np.ndarray  # int64 [rows]: where the output starts in that slice
    # logit biases of every row, concatenated: row r's are bias_ids/bias_values[bias_start[r]:bias_start[r + 1]];
    # None when no row has any
    bias_start: np.ndarray | None = None  # int64 [rows + 1]
    bias_ids: np.ndarray | None = None  # int64
    bias_values: np.ndarray | None = None  # float32
    # int64 [k]: the rows whose logits go back to rank 0 (their requests asked); None for no row
    return_logits: np.ndarray | None = None
    # int64 [seqs]: where prev_rows[i] >= 0, sequence i's one input token is the previous
    # step's sampled id at that row, still on the device (token_ids holds a 0 in its place);
    # -1, or None for every sequence: token_ids holds them
    prev_rows: np.ndarray | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def to_device(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One of a Step's arrays on `device`, queued behind the work before it. A copy from pageable
    memory would wait for that work to finish (and so would the host), which kept a step from
    being launched while the one before it ran; pinned memory is not reused until its copy has
    run."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=True)
