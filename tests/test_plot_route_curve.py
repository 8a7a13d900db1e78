"""bench/plot_route_curve.py reads each route's validation UA from train.py's metrics.csv."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def curve():
    spec = importlib.util.spec_from_file_location("plot_route_curve", REPO / "bench" / "plot_route_curve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_reads_validation_rows_and_draws_them(curve, tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss,val_ua_mean,val_ua_k8,route_lm_ua_k8,route_si_ua_k8\n"
                       "1,2.0,,,,\n100,1.0,0.5,0.6,0.3,0.5\n200,0.8,0.6,0.7,0.45,0.5\n")
    steps, curves = curve.read_curve(metrics)
    assert steps == [100, 200] and curves["route_lm_ua_k8"] == [0.3, 0.45] and curves["val_ua_k8"] == [0.6, 0.7]
    curve.main([str(metrics), "--output", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 1000
    (tmp_path / "empty.csv").write_text("step,loss,val_ua_mean\n1,2.0,\n")
    with pytest.raises(ValueError, match="--eval_every"):
        curve.read_curve(tmp_path / "empty.csv")
