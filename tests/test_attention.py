"""How the prefill kernel (kernels/paged_prefill.py, run on GPUs: tests/test_gpu.py) splits a
step's prompts into tiles, on the CPU."""

from __future__ import annotations

from dist_runtime.kernels.paged_prefill import prefill_tiles


def test_prefill_tiles_cover_each_prompt_once_longest_first():
    # (new tokens, context): two decodes (left to the decode kernel), a fresh prompt of 300,
    # a chunk of 64 after 136 cached tokens, a one-token chunk, a fresh 5
    seqs = [(1, 9), (1, 2), (300, 300), (64, 200), (1, 11), (5, 5)]
    starts = [0]
    for new, _ in seqs:
        starts.append(starts[-1] + new)
    context = [ctx for _, ctx in seqs]
    tiles = prefill_tiles(starts, context, 2, 128)
    assert tiles.dtype.name == "int32" and tiles.shape[1] == 2
    covered = sorted((int(seq), int(start)) for seq, start in tiles)
    assert covered == [(2, 0), (2, 128), (2, 256), (3, 0), (4, 0), (5, 0)]
    keys = [context[seq] - seqs[seq][0] + min(start + 128, seqs[seq][0]) for seq, start in tiles]
    assert keys == sorted(keys, reverse=True)  # the last tile of the 300 (all its keys) first
    assert tuple(tiles[0]) == (2, 256) and keys[-1] == 5
    assert len(prefill_tiles(starts, context, len(seqs), 128)) == 0
