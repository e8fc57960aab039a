"""Headline numbers, the comparison across ablations and the W&B report, on planted results."""

from __future__ import annotations

import json
import socket

import pytest

from polymorph.ablations import derive
from polymorph.compare import compare
from polymorph.errors import PolymorphError
from polymorph.families import build_family
from polymorph.files import atomic_write_json
from polymorph.headline import HeadlineSpec, extract, parse_specs
from polymorph.layout import ANALYSIS_DIR
from polymorph.reports.wandb_report import (
    build_report,
    panel_keys,
    panel_metrics,
    report_spec,
    save_report,
)
from tests.helpers.config import compose

SITES = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid")


def spec(**kw) -> HeadlineSpec:
    base = {"question": "q", "callback": "cb", "source": "rows", "definition": "d", "value": "v"}
    return HeadlineSpec(**{**base, **kw})


def test_rows_are_averaged_per_site_and_a_lone_rows_interval_is_kept():
    result = {"rows": [
        {"pair": [0, 1], "site": "s1", "v": 0.2},
        {"pair": [0, 2], "site": "s1", "v": 0.4},
        {"pair": [0, 1], "site": "s2", "v": {"point": 0.5, "ci_low": 0.4, "ci_high": 0.6,
                                             "n_boot": 200, "level": 0.95}},
    ]}
    by_site = {h.site: h for h in extract(spec(), result)}
    assert by_site["s1"].point == pytest.approx(0.3) and not by_site["s1"].has_interval
    assert by_site["s1"].n_rows == 2
    s2 = by_site["s2"]
    assert (s2.point, s2.ci_low, s2.ci_high, s2.n_boot, s2.level) == (0.5, 0.4, 0.6, 200, 0.95)
    assert s2.text() == "0.5 [0.4, 0.6]" and by_site["s1"].text() == "0.3"


@pytest.mark.parametrize("row, interval", [
    ({"v": 1.0, "v_ci": [0.5, 1.5], "n_boot": 99}, (0.5, 1.5, 99)),
    ({"v": 1.0, "v_ci": {"ci_low": 0.7, "ci_high": 1.2, "n_boot": 10}}, (0.7, 1.2, 10)),
    ({"v": 1.0, "v_ci_low": 0.1, "v_ci_high": 2.0, "v_n_boot": 5}, (0.1, 2.0, 5)),
    ({"v": {"mean": 1.0, "ci_low": 0.9, "ci_high": 1.1, "n_boot": 7}}, (0.9, 1.1, 7)),
    ({"v": 1.0}, (None, None, None)),
])
def test_intervals_are_read_in_every_form_an_analysis_reports_them(row, interval):
    (h,) = extract(spec(source="per_site"), {"per_site": {"s": row}})
    assert h.point == 1.0 and (h.ci_low, h.ci_high, h.n_boot) == interval


def test_an_average_over_pairs_takes_the_interval_the_analysis_reports_for_it():
    result = {"rows": [{"site": "s", "v": 0.2}, {"site": "s", "v": 0.4}],
              "summary": {"s": {"v": {"point": 0.3, "ci_low": 0.1, "ci_high": 0.5,
                                      "n_boot": 1000}}}}
    (h,) = extract(spec(), result)
    assert (h.point, h.ci_low, h.ci_high, h.n_boot) == (0.3, 0.1, 0.5, 1000)


def test_globs_over_a_summary_name_their_entry_and_nan_is_absent():
    result = {"summary": {"eval/tok/mean_a": 0.9, "eval/depth/mean_a": None,
                          "long/tok/mean_a": 0.1}}
    got = extract(spec(source="summary", match="eval/*/mean_a", value=None, name="a"), result)
    assert {(h.site, h.point) for h in got} == {("tok", 0.9), ("depth", None)}
    assert got[0].key == "headline/cb/a/tok"


def test_the_shipped_specs_parse_and_bad_ones_say_what_is_missing():
    specs = parse_specs(compose(["experiment=smoke"], config_name="analyze").compare.headline)
    assert {s.question for s in specs} == {"function match", "SAE transfer", "universality",
                                           "Haar", "steering", "map families"}
    with pytest.raises(PolymorphError, match="needs `definition`"):
        parse_specs([{"question": "q", "callback": "c", "from": "rows", "value": "v"}])
    with pytest.raises(PolymorphError, match="unknown keys"):
        parse_specs([{"question": "q", "callback": "c", "from": "rows", "value": "v",
                      "definition": "d", "typo": 1}])


# -- the comparison on planted analyses ------------------------------------------------------


def planted_results(seeds, ev: float, ci: tuple | None) -> dict:
    rows = []
    for site in SITES:
        value = ev if ci is None else {"point": ev, "ci_low": ci[0], "ci_high": ci[1],
                                       "n_boot": 500, "level": 0.95}
        rows.append({"pair": [0, 1], "site": site, "rotated_ev_standard": value,
                     "naive_ev_standard": ev - 1.0, "ceiling_ev_standard": 0.9})
    return {"meta": {"context": {"seeds": seeds, "scored_batch": "eval"}, "partial": False},
            "sae_transfer": {"rows": rows, "definitions": {"rotated": "planted"}}}


def plant(root, overrides, results):
    cfg = compose(["experiment=smoke", f"paths.root={root}", *overrides], config_name="analyze")
    folder = derive(cfg, build_family(cfg), for_analysis=True).folder(root) / ANALYSIS_DIR
    atomic_write_json(folder / "results.json", results)
    return folder


def comparison_cfg(root, *ablations):
    listed = ",".join(f"'{a}'" for a in ablations)
    return compose(["experiment=smoke", f"paths.root={root}", f"compare.ablations=[{listed}]"],
                   config_name="analyze")


def test_one_row_per_ablation_with_the_reported_intervals_and_a_reading(tmp_path):
    plant(tmp_path, [], planted_results([0, 1], 0.50, (0.45, 0.55)))
    plant(tmp_path, ["io=shared"], planted_results([0, 1], 0.90, (0.85, 0.95)))
    plant(tmp_path, ["sae.expansion=32"], planted_results([0, 1], 0.52, None))
    cfg = comparison_cfg(tmp_path, "io=independent", "io=shared", "sae.init_seed=shared",
                         "sae.expansion=32")
    data, out = compare(cfg, ["experiment=smoke", f"paths.root={tmp_path}"])
    assert out == tmp_path / "smoke" / "comparison"
    names = [a["name"] for a in data["ablations"]]
    assert names == ["smoke preset", "io=shared", "sae.expansion=32"]  # the preset once
    assert data["ablations"][0]["requested_as"] == ["io=independent", "sae.init_seed=shared"]
    shared = {h["key"]: h for h in data["ablations"][1]["headline"]}
    rotated = shared[f"headline/sae_transfer/rotated_ev_standard/{SITES[1]}"]
    assert (rotated["point"], rotated["ci_low"], rotated["ci_high"]) == (0.9, 0.85, 0.95)
    x32 = {h["key"]: h for h in data["ablations"][2]["headline"]}
    assert x32[f"headline/sae_transfer/rotated_ev_standard/{SITES[1]}"]["ci_low"] is None
    reading = " ".join(data["reading"])
    assert "io=shared" in reading and "intervals do not overlap" in reading
    assert "no interval reported" in reading
    md = (out / "comparison.md").read_text()
    assert "0.9 [0.85, 0.95]" in md and "| `sae.expansion=32` |" in md
    assert "rotated_ev_standard" in json.dumps(data["definitions"])
    from PIL import Image

    for fig in data["figures"]:
        Image.open(out / fig).verify()


def test_an_ablation_never_run_is_one_line_with_the_commands_that_make_it(tmp_path):
    plant(tmp_path, [], planted_results([0, 1], 0.5, None))
    cfg = comparison_cfg(tmp_path, "io=independent", "io=shared", "model.d_mlp=128")
    with pytest.raises(PolymorphError) as err:
        compare(cfg, ["experiment=smoke", f"paths.root={tmp_path}"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("never analysed: ")
    assert "python train.py -m seed=0,1 experiment=smoke" in message
    assert "io=shared && python analyze.py experiment=smoke" in message
    assert "model.d_mlp=128" in message and "smoke preset" not in message


@pytest.mark.parametrize("entry, fragment", [("name=x", "picks the experiment"),
                                             ("experiment=default", "picks the experiment"),
                                             ("io", "not an override")])
def test_entries_that_are_not_ablations_are_refused(tmp_path, entry, fragment):
    with pytest.raises(PolymorphError, match=fragment):
        compare(comparison_cfg(tmp_path, "io=shared", entry), [f"paths.root={tmp_path}"])


def test_the_report_is_built_offline_without_touching_the_network(tmp_path, monkeypatch):
    plant(tmp_path, [], planted_results([0, 1], 0.5, (0.4, 0.6)))
    plant(tmp_path, ["io=shared"], planted_results([0, 1], 0.9, None))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    from polymorph.reports.build import SPEC_FILE, make_report

    message = make_report(comparison_cfg(tmp_path, "io=independent", "io=shared"),
                          ["experiment=smoke", f"paths.root={tmp_path}"], dry_run=True)
    spec_file = tmp_path / "smoke" / "comparison" / SPEC_FILE
    assert str(spec_file) in message
    spec_data = json.loads(spec_file.read_text())
    keys = panel_keys(spec_data)
    assert f"headline/sae_transfer/rotated_ev_standard/{SITES[0]}" in keys
    assert "val/min_acc" in keys
    text = json.dumps(spec_data)
    assert "Config('experiment') = 'smoke'" in text and "config.ablation" in text
    assert "0.5 [0.4, 0.6]" in text  # the comparison table is in the report


def test_saving_without_credentials_says_how_to_log_in(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    data = {"experiment": "smoke", "reference": "smoke preset", "command": "python compare.py",
            "reading": [], "definitions": {}, "ablations": []}
    report = build_report(data, "", project="polymorph")
    with pytest.raises(PolymorphError, match="wandb login"):
        save_report(report)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password abc123\n")
    from polymorph.reports.wandb_report import has_credentials

    assert has_credentials()  # where `wandb login` writes the key
    assert panel_metrics(data) == {} and report_spec(report)["entity"] == "offline"
