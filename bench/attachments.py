"""What PDF attachments cost: time and peak memory of read_pdf, pdf_contains and redact_pdf
on a 20-page and a 100-page report, against PDFium rendering the same pages alone.

    .venv/bin/python bench/attachments.py [--pages 20 100] [--dpi 150] [--rounds 3]

The reports are generated (tests/pdfs.py: headings, five paragraphs a page, a phrase on
every page). Every measurement runs in a fresh Python process, so peak RSS (ru_maxrss) is
that operation's alone; "baseline" is such a process that only loads the file and the
libraries. Times are medians of --rounds runs, RSS the largest. The redaction removes the
phrase everywhere, two paragraphs of page 1 and the whole of page 2, at --dpi;
"check_output" is pdf_contains run over that redacted copy (the release's final check).
pdf_contains runs twice (the phrase, then an absent phrase: a full search).

Target on this machine: a 20-page report redacted in under 5 s and under 300 MB RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHRASE = "family conflict"
TARGET_SECONDS = 5.0
TARGET_RSS_MB = 300.0
OPS = ("baseline", "render_only", "read_pdf", "pdf_contains", "redact_pdf", "check_output")


def _child(op: str, path: str, dpi: int) -> None:
    """Run one operation on the PDF at ``path`` and print a JSON line of what it cost."""
    import pypdfium2 as pdfium

    from broker.attachments.pdf import pdf_contains, read_pdf, redact_pdf

    data = Path(path).read_bytes()
    out_size = 0
    if op == "check_output":  # the re-search of a redacted copy (the redaction is not timed)
        data = redact_pdf(data, phrases=[PHRASE], paragraphs={1: [1, 3]}, pages=[2], dpi=dpi)
    start = time.perf_counter()
    if op == "render_only":
        doc = pdfium.PdfDocument(data)
        for index in range(len(doc)):
            page = doc[index]
            bitmap = page.render(scale=dpi / 72, draw_annots=False, may_draw_forms=False)
            bitmap.to_pil().close()
            bitmap.close()
            page.close()
        doc.close()
    elif op == "read_pdf":
        reading = read_pdf(data)
        assert reading.problem is None and reading.pages
    elif op == "pdf_contains":
        assert pdf_contains(data, [PHRASE]) is True
        assert pdf_contains(data, ["custody hearing"]) is False
    elif op == "check_output":
        assert pdf_contains(data, [PHRASE]) is False
    elif op == "redact_pdf":
        out = redact_pdf(data, phrases=[PHRASE], paragraphs={1: [1, 3]}, pages=[2], dpi=dpi)
        out_size = len(out)
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "out_size": out_size}))


def _measure(op: str, path: Path, dpi: int, rounds: int) -> dict[str, float]:
    runs = []
    for _ in range(rounds):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", op, str(path), "--dpi", str(dpi)],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "rss_mb": max(r["rss_mb"] for r in runs),
        "out_size": runs[-1]["out_size"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("OP", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.dpi)
        return 0

    from tests.pdfs import long_report_pdf

    verdict = 0
    with tempfile.TemporaryDirectory() as tmp:
        print(f"dpi {args.dpi}, medians of {args.rounds} fresh processes per figure")
        print(f"{'pages':>5}  {'operation':<13} {'seconds':>8} {'peak RSS MB':>12} {'output':>10}")
        for pages in args.pages:
            path = Path(tmp) / f"report-{pages}.pdf"
            path.write_bytes(long_report_pdf(pages, phrases=[PHRASE]))
            size_kb = path.stat().st_size / 1024
            print(f"{pages:>5}  (input {size_kb:.0f} KB)")
            results = {op: _measure(op, path, args.dpi, args.rounds) for op in OPS}
            for op in OPS:
                r = results[op]
                output = f"{r['out_size'] / 1024:.0f} KB" if r["out_size"] else ""
                print(
                    f"{pages:>5}  {op:<13} {r['seconds']:>8.2f} {r['rss_mb']:>12.0f} {output:>10}"
                )
            redact = results["redact_pdf"]
            per_page = redact["seconds"] / pages
            print(
                f"{pages:>5}  redact_pdf: {per_page * 1000:.0f} ms a page, "
                f"{redact['seconds'] / max(results['render_only']['seconds'], 1e-9):.1f}x "
                f"rendering alone, {redact['out_size'] / pages / 1024:.0f} KB a page"
            )
            if pages == 20:
                ok = redact["seconds"] < TARGET_SECONDS and redact["rss_mb"] < TARGET_RSS_MB
                print(
                    f"{'PASS' if ok else 'FAIL'}: 20-page redaction {redact['seconds']:.2f} s "
                    f"(< {TARGET_SECONDS:.0f} s), {redact['rss_mb']:.0f} MB RSS "
                    f"(< {TARGET_RSS_MB:.0f} MB)"
                )
                verdict = verdict or (0 if ok else 1)
    return verdict


if __name__ == "__main__":
    sys.exit(main())
