"""Regenerate the committed result tables from the runs' own results.json, then the README blocks that show them.

    make results                  # = python bench/results.py: every headline whose runs exist
    python bench/results.py --only demo demo-text

Headlines (csr/report.py: HEADLINES): `make demo` (results/fmnist), `make demo-full` (results/fmnist_full),
`make demo-text` (results/text/{bbc,r8}) and the recipe panel (runs/panel/panel_recommended.json). Each becomes
docs/results/<name>.md, stamped with the command, commit, machine and wall time the run recorded; the README's
`<!-- results:NAME -->` blocks are then replaced by those files (tests/test_results.py checks they match).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.cli import ArgumentParser, run  # noqa: E402
from csr.report import HEADLINES, available, sync_readme, write_all  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> list[Path]:
    p = ArgumentParser(prog="results.py", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(HEADLINES), default=None, help="these headlines only")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"), help="folder of the generated files")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="README whose results blocks are replaced")
    args = p.parse_args(argv)
    have = available(ROOT)
    for name in args.only or HEADLINES:
        if name not in have:
            print(f"{name}: runs missing ({', '.join(HEADLINES[name].runs)}); run `{HEADLINES[name].command}` first")
    written = write_all(Path(args.out), ROOT, [n for n in (args.only or have) if n in have])
    synced = sync_readme(Path(args.readme), Path(args.out))
    print("wrote " + ", ".join(str(w) for w in written) + f"; README blocks: {', '.join(synced) or 'none'}")
    return written


if __name__ == "__main__":
    run(main)
