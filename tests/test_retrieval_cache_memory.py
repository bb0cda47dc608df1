"""The pixel cache is shared by every dataset, split and run on a machine: a run that
wants a few of its images must not read the whole cache into memory to get them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from retrieval.features import PixelCache, _gather


def test_gathered_rows_match_the_rows_across_shards():
    shards = [torch.arange(n * 2, dtype=torch.int64).view(n, 2) + 1000 * i for i, n in enumerate((3, 1, 4))]
    whole = torch.cat(shards)
    rows = [7, 0, 3, 4, 2, 7]
    assert torch.equal(_gather(shards, rows), whole[torch.tensor(rows)])
    assert _gather(shards, []).shape == (0, 2)


def test_a_few_images_from_a_large_cache_cost_only_their_own_memory(tmp_path):
    side, per_shard, shards = 128, 400, 4  # 4 shards of 19.7 MB: 79 MB of pixels
    cache = PixelCache(tmp_path / "cache", "transform")
    gen = torch.Generator().manual_seed(0)
    for s in range(shards):
        keys = [f"img{s}-{i}" for i in range(per_shard)]
        cache.shards.write(keys, {"pixels": torch.randint(0, 256, (per_shard, 3, side, side),
                                                          dtype=torch.uint8, generator=gen)})
    wanted = ["img0-5", "img2-399", "img3-0", "img1-17"]
    # A fresh process, so its peak resident memory is this load's alone.
    script = textwrap.dedent(f"""
        import json, resource, sys
        import torch
        from retrieval.features import PixelCache
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cache = PixelCache({str(tmp_path / "cache")!r}, "transform")
        pixels, row_of, failures = cache.load({{k: "unused" for k in {wanted!r}}}, progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"grew_mb": (after - before) / 1024, "shape": list(pixels.shape),
                           "sums": {{k: int(pixels[row_of[k]].sum()) for k in row_of}},
                           "failures": len(failures)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [4, 3, side, side] and result["failures"] == 0
    keys, data = cache.shards.read()
    whole = torch.cat(data["pixels"])
    for key in wanted:
        assert result["sums"][key] == int(whole[keys.index(key)].sum()), key
    # Reading the whole cache takes 79 MB, and concatenating it as many again.
    assert result["grew_mb"] < 40, result  # measured: 99 MB before, under 10 MB now
