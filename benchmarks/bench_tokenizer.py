"""Benchmark the BPE tokenizer: training time, encode/decode throughput, ours vs tiktoken.

    python benchmarks/bench_tokenizer.py [--data FILE] [--vocab-size 4096] [--no-results]

Prints one JSON object and (unless --no-results) rewrites the "## Tokenizer (issue 5)"
section of benchmarks/RESULTS.md, leaving other sections alone. tiktoken is optional:
without it only our numbers are reported. tiktoken gets the very same vocabulary,
exported with `to_tiktoken`, and its output is checked to equal ours.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygrad_lm.tokenizer import BPETokenizer  # noqa: E402

SECTION = "## Tokenizer (issue 5)"
DEFAULT_DATA = "/work/shared/data/tinyshakespeare.txt"


def timed(fn, repeat: int) -> tuple[float, object]:
    """Best wall time over `repeat` runs, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="UTF-8 text file (default: tiny Shakespeare)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--pattern", default="gpt4")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--no-results", action="store_true", help="only print JSON")
    args = ap.parse_args()

    with open(args.data, encoding="utf-8", newline="") as f:
        text = f.read()
    mb = len(text.encode("utf-8")) / 1e6
    specials = ["<|endoftext|>"]

    # training (pre-tokenization included)
    train_runs = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        tok = BPETokenizer.train(text, args.vocab_size, pattern=args.pattern, special_tokens=specials)
        train_runs.append(time.perf_counter() - t0)

    # encoding: cold = fresh tokenizer (empty pre-token cache), warm = cache filled by a previous pass
    def encode_cold():
        fresh = BPETokenizer(tok.merges, pattern=tok.pattern, special_tokens=tok.special_tokens)
        return fresh.encode_ordinary(text)

    cold_s, ids = timed(encode_cold, args.repeat)
    tok.encode_ordinary(text)
    warm_s, _ = timed(lambda: tok.encode_ordinary(text), args.repeat)
    decode_s, decoded = timed(lambda: tok.decode(ids), args.repeat)
    assert decoded == text, "round trip failed"

    result = {
        "data": args.data,
        "data_mb": round(mb, 3),
        "pattern": args.pattern,
        "vocab_size": tok.vocab_size,
        "merges": len(tok.merges),
        "train_s_best": round(min(train_runs), 3),
        "train_s_median": round(statistics.median(train_runs), 3),
        "tokens": len(ids),
        "bytes_per_token": round(mb * 1e6 / len(ids), 3),
        "ours_encode_cold_mb_s": round(mb / cold_s, 2),
        "ours_encode_warm_mb_s": round(mb / warm_s, 2),
        "ours_decode_mb_s": round(mb / decode_s, 2),
    }

    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        result["tiktoken"] = "not installed"
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken would otherwise cache the file by its path
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "tok.tiktoken")
            tok.to_tiktoken(path)
            enc = tiktoken.Encoding(
                "bench", pat_str=tok.pattern, mergeable_ranks=load_tiktoken_bpe(path), special_tokens=tok.special_tokens
            )
        tt_s, tt_ids = timed(lambda: enc.encode_ordinary(text), args.repeat)
        tt_dec_s, _ = timed(lambda: enc.decode(ids), args.repeat)
        result.update(
            tiktoken_version=tiktoken.__version__,
            tiktoken_encode_mb_s=round(mb / tt_s, 2),
            tiktoken_decode_mb_s=round(mb / tt_dec_s, 2),
            tiktoken_ids_equal_ours=tt_ids == ids,
            tiktoken_speedup_vs_ours_cold=round(cold_s / tt_s, 1),
        )

    result.update(
        date=datetime.date.today().isoformat(),
        machine=f"{os.cpu_count()}-core CPU ({cpu_name()}), Python {platform.python_version()}",
    )
    print(json.dumps(result, indent=2))
    if not args.no_results:
        write_section(Path(args.results), result, " ".join(["python"] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:]))


def write_section(path: Path, r: dict, command: str) -> None:
    """Replace (or append) our section of RESULTS.md; other sections are kept as they are."""
    lines = [
        SECTION,
        "",
        f"- Date: {r['date']}",
        f"- Machine: {r['machine']}",
        f"- Command: `{command}`",
        f"- Corpus: `{r['data']}` ({r['data_mb']} MB), pattern {r['pattern']}, "
        f"vocab {r['vocab_size']} ({r['merges']} merges + 256 bytes + 1 special)",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| training time, best / median of runs (pre-tokenization included) | {r['train_s_best']} s / {r['train_s_median']} s |",
        f"| tokens / compression | {r['tokens']} tokens, {r['bytes_per_token']} bytes per token |",
        f"| ours: encode, cold pre-token cache | {r['ours_encode_cold_mb_s']} MB/s |",
        f"| ours: encode, warm cache | {r['ours_encode_warm_mb_s']} MB/s |",
        f"| ours: decode | {r['ours_decode_mb_s']} MB/s |",
    ]
    if "tiktoken_version" in r:
        lines += [
            f"| tiktoken {r['tiktoken_version']} (same vocabulary): encode | {r['tiktoken_encode_mb_s']} MB/s |",
            f"| tiktoken: decode | {r['tiktoken_decode_mb_s']} MB/s |",
            f"| tiktoken ids identical to ours | {r['tiktoken_ids_equal_ours']} |",
        ]
    else:
        lines.append("| tiktoken | not installed |")
    lines += [
        "",
        "Single thread throughout. tiktoken is Rust; ours is pure Python (regex split, then a",
        "per-pre-token cache in front of BPE by rank), so tiktoken is expected to be several times faster.",
        "",
    ]
    section = "\n".join(lines)
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: section + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.write_text(new.rstrip("\n") + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
