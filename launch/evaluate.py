"""python launch/evaluate.py --sr=DIR[,DIR...] [--hr=DIR] [--names=A,B] [--dataset=RealSR] [--crop=512]
    [--metrics=psnr,ssim,lpips,lpips_alex,dists,fid,clipiqa,musiq,maniqa,topiq,qalign,niqe] [--lpips=FILE]
    [--lpips_alex=FILE] [--dists=FILE] [--output=DIR]
python launch/evaluate.py --sweep=100,200,...,900 --lq=DIR --hr=DIR --output=DIR --config=CONFIG
    [--workdir=DIR | --tadsr_ckpt=FILE | --generator=FILE] [--config.sr.KEY=VALUE ...]   (SR at each t, then scores)
python launch/evaluate.py --sweep=100,...,900 --sr=SWEEP_OUTPUT_DIR --hr=DIR      (outputs of launch/sr.py --sweep)

Scores SR outputs against HR references matched by file name (or, with --sr alone, no-reference metrics), writes
<output>/metrics.json and a markdown table laid out like the paper's Table 1 (<output>/metrics.md; one column per
--sr folder; docs/metrics.md says what each metric needs). With --sweep, one column per timestep plus
<output>/sweep.png (each metric against t, the paper's Fig. 6). Columns are compared on the same images only:
those scored in every column (one line per column lists what it left out; the table's last row and each column's
`images` in the JSON give the count); FID is computed on those images too. Unmatched and unreadable files get one
line each; the exit status is 1 if any file failed. The last line printed is the metrics JSON (the means over the
images).
"""

import json
import os
import sys

from absl import flags

from tadsr_jax import cli, runtime, storage

_SR = flags.DEFINE_list("sr", None, "SR output folder(s); one table column each.")
_HR = flags.DEFINE_string("hr", None, "Reference (HR) folder; files are matched to SR outputs by name.")
_NAMES = flags.DEFINE_list("names", None, "Column labels of the --sr folders (default: their folder names).")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset label of the table (default: the HR folder's name).")
_CROP = flags.DEFINE_integer(
    "crop", 0, "Centre-crop SR and HR to this square side before scoring (0: whole).", lower_bound=0
)
_METRICS = flags.DEFINE_list(
    "metrics",
    None,
    "Metrics (default: psnr, ssim, plus lpips/lpips_alex/dists when their "
    "weights are given; with --sr alone: clipiqa, musiq, maniqa, topiq through pyiqa). "
    "fid, qalign and the no-reference ones need pyiqa.",
)
_LPIPS = flags.DEFINE_string("lpips", "", "LPIPS-VGG weights (launch/convert.py --what=lpips); not the paper's LPIPS.")
_LPIPS_ALEX = flags.DEFINE_string(
    "lpips_alex", "", "LPIPS-AlexNet weights, the paper's LPIPS (launch/convert.py --what=lpips_alex)."
)
_DISTS = flags.DEFINE_string("dists", "", "DISTS weights (launch/convert.py --what=dists).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Same-shape images scored per call.", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None, "Report folder (default: the first --sr folder).")
_SWEEP = flags.DEFINE_list("sweep", None, "Timesteps of the fidelity-realism sweep (e.g. 100,300,500,700,900).")
_LQ = flags.DEFINE_string("lq", None, "--sweep: low-quality inputs to super-resolve at each timestep first.")
_CONFIG = cli.define_config(help_text="--lq: the experiment config of the SR model.")
_WORKDIR = flags.DEFINE_string("workdir", "", "--lq: generator from a training workdir's latest checkpoint.")
_TADSR_CKPT = flags.DEFINE_string("tadsr_ckpt", "", "--lq: the reference's released tadsr.pkl (needs torch).")
_GENERATOR = flags.DEFINE_string("generator", "", "--lq: generator weights exported by launch/convert.py.")


def _run(log) -> tuple[dict, bool]:
    from tadsr_jax import evaluation

    sweep = cli.sweep_timesteps(_SWEEP.value or None)
    if _LQ.value:
        if not sweep:
            raise ValueError("--lq is for --sweep; to score existing outputs pass --sr")
        if not (_OUTPUT.value and _CONFIG.value):
            raise ValueError("--sweep with --lq needs --output and --config")
        from tadsr_jax.infer import session
        from tadsr_jax.infer.model import WeightsSource

        sr_dirs = [os.path.join(_OUTPUT.value, "sr")]
        source = WeightsSource(tadsr_ckpt=_TADSR_CKPT.value, generator=_GENERATOR.value, workdir=_WORKDIR.value)
        report = session.run(_CONFIG.value, _LQ.value, sr_dirs[0], source, sweep=sweep, log=log)
        if report.failed:
            print(f"note: {len(report.failed)} input(s) failed to super-resolve", file=log)
    elif _SR.value:
        sr_dirs = _SR.value
    else:
        raise ValueError("give --sr=DIR (or --sweep with --lq=DIR)")
    for folder in [*sr_dirs, *([_HR.value] if _HR.value else [])]:
        if not storage.isdir(folder):
            raise ValueError(f"{folder}: not a folder")
    weights = {"lpips": _LPIPS.value, "lpips_alex": _LPIPS_ALEX.value, "dists": _DISTS.value}
    names = _METRICS.value or evaluation.default_metrics(
        reference=bool(_HR.value), weights=[name for name, path in weights.items() if path], log=log
    )
    scorer = evaluation.Scorer(
        names, **{name: evaluation.load_metric_net(name, path) for name, path in weights.items()}
    )
    output = _OUTPUT.value or sr_dirs[0]
    storage.makedirs(output)
    dataset = _DATASET.value or os.path.basename(os.path.normpath(_HR.value or sr_dirs[0]))
    if sweep:
        if len(sr_dirs) != 1:
            raise ValueError("--sweep scores one folder of <name>_t<T> outputs")
        runs = {f"t={t}": (sr_dirs[0], f"_t{t}") for t in sweep}
    else:
        labels = _NAMES.value or [os.path.basename(os.path.normpath(d)) for d in sr_dirs]
        if len(labels) != len(sr_dirs):
            raise ValueError(f"--names has {len(labels)} labels for {len(sr_dirs)} --sr folders")
        runs = {label: (folder, "") for label, folder in zip(labels, sr_dirs)}
    matchings = {}
    for label, (folder, suffix) in runs.items():
        matching = evaluation.match_files(folder, _HR.value, suffix=suffix)
        for path in matching.unmatched_sr:
            print(f"unmatched: {path}: no file of that name in {_HR.value}", file=log)
        for path in matching.unmatched_hr:
            print(f"unmatched: {path}: no SR output of that name in {folder}", file=log)
        for path in matching.duplicates:
            print(f"duplicate: {path}: another file of its folder has the same name; ignored", file=log)
        if not matching.pairs:
            raise ValueError(f"{folder}: no image{' matches a file of ' + _HR.value if _HR.value else ''}")
        matchings[label] = matching
    comparison = evaluation.compare(matchings, scorer, crop=_CROP.value, batch_size=_BATCH_SIZE.value, log=log)
    results, means = comparison.to_json(), comparison.means()
    failed = any(column.failed for column in comparison.columns.values())
    table = evaluation.markdown_table(dataset, means, {label: r["images"] for label, r in results.items()})
    evaluation.write_report(
        os.path.join(output, "metrics"), {"dataset": dataset, "crop": _CROP.value, **results}, table
    )
    if sweep:
        evaluation.sweep_plot({t: means[f"t={t}"] for t in sweep}, os.path.join(output, "sweep.png"), dataset)
    print(table, file=log)
    if len(results) == 1:
        (only,) = results.values()
        summary = {**only["mean"], "images": only["images"], "failed": len(only["failed"])}
    else:
        summary = {label: {**r["mean"], "images": r["images"]} for label, r in results.items()}
    return summary, failed


def main(argv):
    del argv
    runtime.set_xla_cpu_flags()
    runtime.enable_compilation_cache()
    from tadsr_jax.images import ImageError
    from tadsr_jax.metrics import PyiqaUnavailable
    from tadsr_jax.weights.convert import WeightsError

    try:
        summary, failed = _run(sys.stderr)
    except (ImageError, WeightsError, PyiqaUnavailable, ValueError, ImportError, OSError) as e:
        for line in str(e).splitlines():  # an OutputError has one line per problem
            print(f"evaluate: error: {line}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
