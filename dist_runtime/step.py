"""A Step: everything every rank needs to run one forward pass in lockstep, as flat arrays.

Rank 0 builds it, the control plane ships it, and a rank's ModelRunner is a function of
(Step, its weights, its KV cache). Sequence i's new tokens are
`token_ids[query_start[i]:query_start[i + 1]]`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Step:
    token_ids: np.ndarray  # int64 [tokens]
    positions: np.ndarray  # int64 [tokens]
    slot_mapping: np.ndarray  # int64 [tokens]: KV-cache slot each token writes
    query_start: np.ndarray  # int64 [seqs + 1]
    context_lens: np.ndarray  # int64 [seqs]: cached tokens after this step
    block_tables: np.ndarray  # int32 [seqs, max_blocks], padded with 0
    temperature: np.ndarray  # float32 [seqs]; 0 is greedy
    top_k: np.ndarray  # int64 [seqs]; 0 is off
    top_p: np.ndarray  # float32 [seqs]; 1 is off
    seeds: np.ndarray  # int64 [seqs]
    sample_index: np.ndarray  # int64 [seqs]: tokens the sequence generated before this one
    return_logits: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
