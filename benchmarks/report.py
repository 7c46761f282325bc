"""Regenerate benchmarks/RESULTS.md (and the README's results summary) from every
benchmark script, in one command.

    python benchmarks/report.py                 # run every job on this device, then render
    python benchmarks/report.py --only deq,node # rerun some jobs, keep the others' results
    python benchmarks/report.py --render        # render only, from the stored results
    python benchmarks/report.py --check         # exit 1 if RESULTS.md or the README differ

Each job (`jobs.py`) runs in its own process and stores its raw results, with the exact
command, the device, the versions and the date, in `benchmarks/results/<device>/<job>.json`.
RESULTS.md is rendered from those files for every device that has them (so a GPU run
adds its own tables next to the CPU ones) by `renderers.py`, with each section's prose
from `templates/<section>.md`; its summary table is copied into README.md between the
`results-summary` markers.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

from jobs import Job, JOBS
from renderers import render, ROOT, SUMMARY_BEGIN, SUMMARY_END


RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
README = ROOT / "README.md"


def device_tag() -> tuple[str, str]:
    """(directory name, description) of the device JAX uses here."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu", f"CPU, {os.cpu_count()} cores"
    kind = dev.device_kind
    return f"{dev.platform}-" + "".join(c if c.isalnum() else "-" for c in kind.lower()), \
        f"{dev.platform.upper()}: {kind}, {os.cpu_count()} CPU cores"


def run_job(name: str, job: Job, out_dir: pathlib.Path, description: str) -> None:
    import jax

    out = out_dir / f"{name}.json"
    with tempfile.TemporaryDirectory() as tmp:
        raw = pathlib.Path(tmp) / "raw.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        argv = [a.replace("{json}", str(raw)).replace("{tmp}", tmp)
                .replace("{out_dir}", str(out_dir)) for a in job.argv]
        shown = " ".join(["python"] + [a.replace(str(raw), "OUT.json").replace(tmp, "TMP")
                                       .replace(str(ROOT) + "/", "")
                                       if a else '""' for a in argv])
        print(f"== {name}: {shown}", flush=True)
        t0 = datetime.datetime.now()
        subprocess.run([sys.executable] + argv, cwd=ROOT, check=True)
        if job.produces:
            shutil.copy(pathlib.Path(tmp) / job.produces, raw)
        for kept in job.keeps:
            shutil.copy(pathlib.Path(tmp) / kept, out_dir / (name + pathlib.Path(kept).suffix))
        data = json.loads(raw.read_text())
    meta = {"command": shown, "device": description, "jax": jax.__version__,
            "python": platform.python_version(), "date": t0.strftime("%Y-%m-%d"),
            "wall_seconds": (datetime.datetime.now() - t0).total_seconds()}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"meta": meta, "data": data}, indent=1))
    os.replace(tmp_out, out)



def with_summary(readme: str, summary_text: str) -> str:
    """README.md's text with the summary between its markers replaced."""
    if SUMMARY_BEGIN not in readme:
        return readme
    head, rest = readme.split(SUMMARY_BEGIN, 1)
    tail = rest.split(SUMMARY_END, 1)[1]
    return f"{head}{SUMMARY_BEGIN}\n{summary_text}\n{SUMMARY_END}{tail}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help=f"comma-separated jobs of: {', '.join(JOBS)}")
    p.add_argument("--render", action="store_true", help="render only; run nothing")
    p.add_argument("--check", action="store_true",
                   help="run nothing, write nothing: exit 1 if RESULTS.md or the README's "
                        "summary differ from their rendering")
    a = p.parse_args()
    if a.check:
        text, summary_text = render()
        stale = [str(f.relative_to(ROOT)) for f, want in (
            (RESULTS_MD, text), (README, with_summary(README.read_text(), summary_text)))
            if f.read_text() != want]
        if stale:
            sys.exit(f"{', '.join(stale)} differ from the stored results' rendering: run "
                     "`python benchmarks/report.py --render`")
        return
    failed = []
    if not a.render:
        names = a.only.split(",") if a.only else list(JOBS)
        unknown = [n for n in names if n not in JOBS]
        if unknown:
            p.error(f"--only: unknown job(s) {unknown}; expected some of {list(JOBS)}")
        tag, description = device_tag()
        for n in names:
            try:
                run_job(n, JOBS[n], RESULTS_DIR / tag, description)
            except subprocess.CalledProcessError as err:  # keep going; the old results stay
                print(f"!! job {n} failed ({err}); its stored results are unchanged",
                      file=sys.stderr)
                failed.append(n)
    text, summary_text = render()
    RESULTS_MD.write_text(text)
    README.write_text(with_summary(README.read_text(), summary_text))
    print(f"wrote {RESULTS_MD} and the README summary")
    if failed:
        sys.exit(f"failed jobs: {', '.join(failed)}")


if __name__ == "__main__":
    main()
