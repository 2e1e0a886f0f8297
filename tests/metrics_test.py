"""Tests of the metric writer: JSON lines, NaN as null, truncation on resume."""

from pvae_jax.metrics import MetricWriter, read_metrics


def test_records_are_appended_and_truncated_on_resume(tmp_path):
    writer = MetricWriter(str(tmp_path), tensorboard=True)
    for step in (1, 2, 3):
        writer.write(step, "train", {"train/loss": 10.0 / step})
    out = writer.write(3, "eval", {"eval/nll_bound": float("nan")})
    writer.close()
    assert out == {"eval/nll_bound": None}
    records = read_metrics(str(tmp_path))
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    assert records[1]["train/loss"] == 5.0
    assert records[3]["eval/nll_bound"] is None  # JSON has no NaN.
    assert (tmp_path / "tensorboard").is_dir()

    resumed = MetricWriter(str(tmp_path), tensorboard=False)
    resumed.truncate_after(2)
    resumed.write(3, "train", {"train/loss": 3.0})
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_a_line_cut_short_by_a_kill_is_ignored_and_dropped_on_resume(tmp_path):
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2):
        writer.write(step, "train", {"train/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "train", "train/lo')  # A kill mid-write.
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    resumed = MetricWriter(str(tmp_path), tensorboard=False)
    resumed.truncate_after(2)
    resumed.write(3, "train", {"train/loss": 3.0})
    assert read_metrics(str(tmp_path)) == [
        {"step": s, "split": "train", "train/loss": float(s)} for s in (1, 2, 3)]
