"""Every command against bad, hostile and interrupted inputs (issue 16, items 11-15): one-line
errors and no tracebacks, inputs byte-identical afterwards, model folders verified on load, and
one spelling of each option across the commands."""

import dataclasses
import hashlib
import json
import os
import zipfile

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

import perturbax.inference.result as result_module
from perturbax.cli import main
from perturbax.data.simulate import simulate_additive_shift
from perturbax.inference.result import FitResult

KEY = "perturbation"
# long spellings (valid on the base commit too, so each test fails there for its own reason)
# --no-select: these tests are about paths and messages, not the nested estimator (one fit, not three)
FIT_ARGS = ["--perturbation-key", KEY, "--control", "control", "--steps", "20", "--batch-size", "64",
            "--latent-dim", "2", "--no-progress", "--no-select"]
EVAL = ["--perturbation-key", KEY, "--control", "control"]


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(res, *needles):
    """Exit status non-zero, no traceback, exactly one one-line error naming ``needles``."""
    assert res.exit_code not in (0, None), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _digest(path) -> dict:
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    adata, _ = simulate_additive_shift(n_perturbations=2, latent_dim=2, n_genes=6, n_cells=30, n_out_of_span=0,
                                       seed=1)
    paths = {"data": tmp / "data.h5ad", "control_only": tmp / "control_only.h5ad", "design": tmp / "design.csv",
             "model": tmp / "model", "pred": tmp / "pred.h5ad", "source": tmp / "source.h5ad"}
    adata.write_h5ad(paths["data"])
    adata[(adata.obs[KEY] == "control").to_numpy()].copy().write_h5ad(paths["control_only"])
    adata[(adata.obs[KEY] == "P0").to_numpy()].copy().write_h5ad(paths["source"])
    paths["design"].write_text("P0,P1\n0,0\n1,0\n0,1\n")
    res = _run(["fit", paths["data"], *FIT_ARGS, "--out", paths["model"]])
    assert res.exit_code == 0, res.output
    res = _run(["predict", paths["model"], "--perturbations", "P0+P1", "--n-cells", "10", "--num-samples", "4",
                "--out", paths["pred"]])
    assert res.exit_code == 0, res.output
    conditions = sorted(set(adata.obs[KEY].astype(str)) - {"control"})
    return {"tmp": tmp, "paths": paths, "conditions": conditions}


@pytest.fixture()
def unchanged(env):
    """Every input file (and the model folder) is byte-identical after the test."""
    before = {k: _digest(p) for k, p in env["paths"].items()}
    yield env["paths"]
    assert {k: _digest(p) for k, p in env["paths"].items()} == before


# ----------------------------------------------------------------- item 11: outputs vs inputs
def test_outputs_never_overwrite_inputs(env, unchanged, tmp_path):
    p = unchanged
    link = tmp_path / "link.h5ad"
    link.symlink_to(p["data"])
    relative = os.path.relpath(p["data"], os.getcwd())
    cases = [
        (["predict", p["model"], "--perturbations", "P0", "--out", p["data"]], "training data"),
        (["predict", p["model"], "--perturbations", "P0", "--out", link], "training data"),
        (["predict", p["model"], "--perturbations", "P0", "--out", relative], "training data"),
        (["predict", p["model"], "--perturbations", "P0", "--out", p["source"], "--source-cells", p["source"]], "--source-cells"),
        (["predict", p["model"], "--perturbations", "P0", "--out", p["model"] / "meta.json"], "MODEL_DIR"),
        (["predict", p["model"], "--perturbations", "P0", "--out", tmp_path / "x.h5ad", "--summary", tmp_path / "x.h5ad"],
         "--summary"),
        (["evaluate", p["pred"], p["data"], *EVAL, "--out", p["data"]], "TRUTH"),
        (["evaluate", p["pred"], p["data"], *EVAL, "--out", p["pred"]], "PRED"),
        (["check-design", p["data"], *EVAL, "--json", p["data"]], "DATA"),
        (["check-design", "--design", p["design"], "--json", p["design"]], "--design"),
        (["fit", p["data"], *FIT_ARGS, "--out", p["model"]], "not empty"),
        (["fit", p["data"], *FIT_ARGS, "--out", p["data"].parent, "--overwrite"], "would hold the input"),
    ]
    for args, needle in cases:
        _refused(_run(args), needle)
    assert not (tmp_path / "x.h5ad").exists()


def test_fit_overwrite_only_replaces_a_saved_fit(env, unchanged, tmp_path, monkeypatch):
    import perturbax.inference.fitting as fitting

    (tmp_path / "notes.txt").write_text("mine")
    _refused(_run(["fit", unchanged["data"], *FIT_ARGS, "--out", tmp_path, "--overwrite"]), "did not write")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # a saved fit is replaced with --overwrite (the fit itself stubbed: this is about the folder)
    good = FitResult.load(unchanged["model"])
    monkeypatch.setattr(fitting, "fit", lambda *a, **k: dataclasses.replace(good, info={**good.info, "seed": 99}))
    target = _copy_model(unchanged["model"], tmp_path / "m")
    _refused(_run(["fit", unchanged["data"], *FIT_ARGS, "--out", target]), "--overwrite")
    res = _run(["fit", unchanged["data"], *FIT_ARGS, "--out", target, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert FitResult.load(target).info["seed"] == 99
    assert sorted(os.listdir(tmp_path)) == ["m", "notes.txt"]


# ------------------------------------------------------------------ item 14: one-line errors
def test_bad_inputs_give_one_line_errors(env, unchanged, tmp_path):
    p = unchanged
    not_h5ad = tmp_path / "table.h5ad"
    not_h5ad.write_text("gene,value\nA,1\n")
    cases = [
        (["fit", p["control_only"], *FIT_ARGS, "--out", tmp_path / "m1"], "only control cells"),
        (["fit", p["data"], *FIT_ARGS, "--holdout", ",".join(env["conditions"]), "--out", tmp_path / "m2"],
         "only control cells"),
        (["fit", p["data"], *FIT_ARGS, "--learning-rate", "inf", "--out", tmp_path / "m3"], "finite"),
        (["fit", p["data"], *FIT_ARGS, "--learning-rate", "nan", "--out", tmp_path / "m3"], "finite"),
        (["fit", p["data"], *FIT_ARGS, "--sep", ",", "--out", tmp_path / "m4"], "--sep"),
        (["evaluate", p["pred"], p["data"], *EVAL, "--sep", ","], "--sep"),
        (["check-design", "--design", p["design"], "--sep", ","], "--sep"),
        (["evaluate", p["pred"], not_h5ad, *EVAL], "Cannot read"),
        (["evaluate", not_h5ad, p["data"], *EVAL], "Cannot read"),
        (["predict", p["model"], "--perturbations", "P0", "--interval", "nan", "--out", tmp_path / "q.h5ad"], "finite"),
        (["predict", p["model"], "--perturbations", "P0", "--times", "inf", "--out", tmp_path / "q.h5ad"], "--times"),
        (["predict", p["model"], "--perturbations", "P0,P1", "--n-cells", str(10**12), "--out", tmp_path / "q.h5ad"],
         "GiB of memory"),
    ]
    for args, needle in cases:
        _refused(_run(args), needle)
    assert sorted(os.listdir(tmp_path)) == ["table.h5ad"]


def test_fit_whose_loss_was_never_finite_saves_nothing(env, unchanged, tmp_path, monkeypatch):
    import perturbax.inference.fitting as fitting

    good = FitResult.load(unchanged["model"])

    def diverged(*args, **kwargs):
        return dataclasses.replace(good, info={**good.info, "stop_reason": "nan", "steps_run": 0})

    monkeypatch.setattr(fitting, "fit", diverged)
    _refused(_run(["fit", unchanged["data"], *FIT_ARGS, "--out", tmp_path / "m"]), "nothing was saved")
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------- items 13, 14: hostile model folders
def _copy_model(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_meta(folder, edit):
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def _replace_npz(folder, name, data: bytes, layout=None):
    """Swap an npz and record it in meta.json as an attacker would (sizes and checksums match)."""
    (folder / name).write_bytes(data)

    def edit(meta):
        if "files" in meta:
            meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if layout is not None:
            meta["param_layout"] = layout

    _edit_meta(folder, edit)


def _npy_bytes_declaring(shape, dtype="<f4", payload=b"\0" * 64) -> bytes:
    """An .npy member whose header declares ``shape`` whatever ``payload`` holds."""
    import io

    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return out.getvalue() + payload


class _ReadArrayData(BaseException):
    """Raised if array data is read (not an Exception, so no ``except Exception`` hides it)."""


@pytest.fixture()
def no_array_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise _ReadArrayData

    monkeypatch.setattr(np.lib.format, "read_array", refuse)
    monkeypatch.setattr(result_module, "_dummy_batch", refuse)


def test_hostile_model_folders_are_refused_before_allocating(env, unchanged, tmp_path, no_array_reads):
    model = unchanged["model"]
    meta = json.loads((model / "meta.json").read_text())
    name = next(iter(meta["param_layout"]))

    def make(tag):
        return _copy_model(model, tmp_path / tag)

    huge_genes = make("huge_genes")
    _edit_meta(huge_genes, lambda m: m["config"].update(n_genes=10**9))
    negative = make("negative")
    _edit_meta(negative, lambda m: m.update(n_train=-5))
    nested = make("nested")
    text = (nested / "meta.json").read_text()
    (nested / "meta.json").write_text(text[:-1] + ', "deep": ' + "[" * 100000 + "]" * 100000 + "}")
    shallow_deep = make("deep40")
    _edit_meta(shallow_deep, lambda m: m["info"].update(deep=json.loads("[" * 40 + "]" * 40)))
    lying = make("lying_header")
    buf = _zip({name + ".npy": _npy_bytes_declaring((10**5, 10**5))})
    _replace_npz(lying, "params.npz", buf, layout={name: [10**5, 10**5]})
    bomb = make("bomb")
    raw = {name + ".npy": _npy_bytes_declaring((2000, 10**4), payload=b"\0" * (2000 * 10**4 * 4))}
    _replace_npz(bomb, "params.npz", _zip(raw, zipfile.ZIP_DEFLATED), layout={name: [2000, 10**4]})
    types = make("types")
    _edit_meta(types, lambda m: m.update(gene_names={"a": 1}))
    for folder, needle in [(huge_genes, "n_genes"), (negative, "n_train"), (nested, "nested"),
                           (shallow_deep, "nested deeper"), (lying, "does not fit"), (bomb, "uncompressed"),
                           (types, "gene_names")]:
        with pytest.raises(ValueError, match=needle):
            FitResult.load(folder)
        _refused(_run(["predict", folder, "--perturbations", "P0", "--out", tmp_path / "p.h5ad"]), needle)
    assert not (tmp_path / "p.h5ad").exists()


def _zip(members: dict, compression=zipfile.ZIP_STORED) -> bytes:
    import io

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return out.getvalue()


# ------------------------------------------------------------------------- item 12: atomic save
def test_interrupted_save_leaves_the_old_fit_and_mixed_folders_never_load(env, unchanged, tmp_path, monkeypatch):
    old = FitResult.load(unchanged["model"])
    target = old.save(tmp_path / "fit")
    name = next(k for k, v in old.params.items() if hasattr(v, "shape"))
    new = dataclasses.replace(old, params={**old.params, name: old.params[name] + 1.0})
    real_savez = np.savez

    def interrupted(file, **arrays):
        if str(file).endswith("basal.npz"):
            raise KeyboardInterrupt
        return real_savez(file, **arrays)

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save(target, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "fresh")
    monkeypatch.setattr(np, "savez", real_savez)
    assert sorted(os.listdir(tmp_path)) == ["fit"]  # no half-written folder, no temporary left behind
    again = FitResult.load(target)
    np.testing.assert_array_equal(np.asarray(again.params[name]), np.asarray(old.params[name]))

    # a folder mixing the parameters of one save with the metadata of another never loads
    other = new.save(tmp_path / "other")
    own = (target / "params.npz").read_bytes()
    (target / "params.npz").write_bytes((other / "params.npz").read_bytes())
    with pytest.raises(ValueError, match="mixes two saves"):
        FitResult.load(target)
    (target / "params.npz").write_bytes(own)
    (target / "basal.npz").unlink()
    with pytest.raises(ValueError, match="basal.npz is missing"):
        FitResult.load(target)

    # replacing a saved fit needs overwrite=True, and then the new parameters load
    with pytest.raises(FileExistsError):
        new.save(other)
    new.save(other, overwrite=True)
    np.testing.assert_array_equal(np.asarray(FitResult.load(other).params[name]), np.asarray(new.params[name]))


# ----------------------------------------------------------------- item 15: one spelling
def test_each_option_has_one_spelling_across_commands():
    import click

    shorts: dict[str, set] = {}
    longs: dict[str, set] = {}
    ctx = click.Context(main)
    for cmd_name in main.list_commands(ctx):
        for param in main.get_command(ctx, cmd_name).params:
            if not isinstance(param, click.Option):
                continue
            long = [o for o in param.opts if o.startswith("--")]
            short = [o for o in param.opts if not o.startswith("--")]
            for lo in long:
                shorts.setdefault(lo, set()).update(short or [None])
            for sh in short:
                longs.setdefault(sh, set()).update(long)
    mixed = {lo: s for lo, s in shorts.items() if len(s - {None}) > 1 or (None in s and len(s) > 1)}
    assert not mixed, mixed
    clashing = {sh: lo for sh, lo in longs.items() if len(lo) > 1}
    assert not clashing, clashing
    assert longs["-k"] == {"--perturbation-key"} and longs["-p"] == {"--perturbations"}
