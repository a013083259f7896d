"""Hugging Face ``datasets`` folders (``save_to_disk``) as text data: ``--data datasets:DIR:FIELD[:LABEL]``.

The same records as a jsonl file give the same tokens, labels, samples and calibration data; a
``ClassLabel`` column gives its ids and names. The tokenizer and the model are the tiny in-process
ones of tests/hf_tiny.py, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from sensplan._errors import DataSpecError  # noqa: E402
from sensplan.cli import main  # noqa: E402
from sensplan.sensitivity import DataSpec, load_calibration_set, load_eval_set  # noqa: E402

from . import hf_tiny  # noqa: E402

NAMES = ["pos", "neg", "neu"]  # a ClassLabel's order, deliberately not sorted


@pytest.fixture(autouse=True)
def _quiet() -> None:
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    hf_tiny.tokenizer().save_pretrained(folder)
    return folder


def _rows(n: int = 30) -> list[dict[str, object]]:
    return [{"text": f"record {i} " + "word " * (i % 7), "label": i % 3, "n": i} for i in range(n)]


def _save(rows: list[dict[str, object]], folder: Path) -> Path:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES),
                                  "n": datasets.Value("int64")})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return folder


def _jsonl(rows: list[dict[str, object]], path: Path) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _spec(text: str, tok: Path) -> DataSpec:
    return dataclasses.replace(DataSpec.parse(text), tokenizer=str(tok), seq_len=16)


def test_a_saved_dataset_tokenizes_as_the_same_records_in_jsonl(tok: Path, tmp_path: Path) -> None:
    rows = _rows()
    folder, jsonl = _save(rows, tmp_path / "ds"), _jsonl(rows, tmp_path / "d.jsonl")
    spec = DataSpec.parse(f"datasets:{folder}:text:label")
    assert (spec.kind, spec.root, spec.text_field, spec.label_field) == ("datasets", str(folder), "text", "label")
    ds = load_eval_set(_spec(f"datasets:{folder}:text:label", tok), n=None)
    js = load_eval_set(_spec(f"jsonl:{jsonl}:text:label", tok), n=None)
    assert ds.x.dtype == torch.long and torch.equal(ds.x, js.x)
    assert torch.equal(ds.y, js.y) and np.array_equal(ds.indices, js.indices)
    assert ds.classes == NAMES and js.classes == ["0", "1", "2"]  # the ClassLabel's names, in its order
    assert ds.description["per_class"] == [10, 10, 10]
    plain = load_eval_set(_spec(f"datasets:{folder}:text", tok), n=None)  # no label: a language model's text
    assert torch.equal(plain.x, js.x) and bool((plain.y == -1).all())


def test_samples_and_calibration_are_disjoint_and_seeded_as_for_jsonl(tok: Path, tmp_path: Path) -> None:
    rows = _rows(40)
    folder, jsonl = _save(rows, tmp_path / "ds"), _jsonl(rows, tmp_path / "d.jsonl")
    picked = {}
    for kind, where in (("datasets", folder), ("jsonl", jsonl)):
        sample = load_eval_set(_spec(f"{kind}:{where}:text:label", tok), n=12, seed=3)
        cal = load_calibration_set(sample, 9, seed=3)
        first, rest = sample.split(6, seed=3)
        assert not set(sample.indices.tolist()) & set(cal.indices.tolist())
        assert not set(first.indices.tolist()) & set(rest.indices.tolist())
        picked[kind] = (sample.indices, cal.indices, first.indices, sample.x, cal.x)
    for a, b in zip(picked["datasets"], picked["jsonl"], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    again = load_eval_set(_spec(f"datasets:{folder}:text:label", tok), n=12, seed=3)
    assert np.array_equal(again.indices, picked["datasets"][0])
    # the recorded spec reads the same folder again, and says where it is
    desc = again.description
    assert desc["spec"] == f"datasets:{folder}:text:label" and desc["kind"] == "datasets"
    assert desc["root_resolved"] == str(folder.resolve())
    back = DataSpec.from_record(desc)
    assert back == _spec(f"datasets:{folder}:text:label", tok)
    assert back.same_source(DataSpec.parse(f"datasets:{folder}/:text"))
    # saved anew with other records: tokenized anew, not taken from the cache
    _save(_rows(20), folder)
    assert len(load_eval_set(_spec(f"datasets:{folder}:text:label", tok), n=None)) == 20


def test_a_dataset_dict_folder_names_its_splits(tok: Path, tmp_path: Path) -> None:
    one = datasets.Dataset.from_list(_rows(6))
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataSpecError, match=r"DatasetDict \(splits: train, test\)") as e:
        load_eval_set(_spec(f"datasets:{tmp_path / 'dd'}:text", tok))
    msg = str(e.value)
    assert f"datasets:{tmp_path / 'dd' / 'SPLIT'}:text, SPLIT one of them" in msg and "\n" not in msg
    assert len(load_eval_set(_spec(f"datasets:{tmp_path / 'dd' / 'test'}:text", tok), n=None)) == 6
    # the folder given as an image folder says how to read it instead
    with pytest.raises(DataSpecError, match="Hugging Face datasets folder"):
        load_eval_set(DataSpec.parse(str(tmp_path / "dd")))


def test_unlabelled_records_are_refused_in_a_classlabel_or_integer_label_column(tok: Path, tmp_path: Path) -> None:
    rows = _rows(6)
    rows[2] = {**rows[2], "label": -1, "n": -1}  # a benchmark's unlabelled test split writes -1
    folder = _save(rows, tmp_path / "ds")
    for column in ("label", "n"):  # a ClassLabel, an int64 column
        with pytest.raises(DataSpecError, match=r"some records have no label \(-1\)"):
            load_eval_set(_spec(f"datasets:{folder}:text:{column}", tok))
    # a DatasetDict given where images were expected: the hint names a split's folder
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(6))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataSpecError, match=r"datasets:.*dd/SPLIT:TEXT_COLUMN"):
        load_eval_set(DataSpec.parse(str(tmp_path / "dd")))


def test_a_missing_or_non_text_column_names_the_columns(tok: Path, tmp_path: Path) -> None:
    folder = _save(_rows(6), tmp_path / "ds")
    with pytest.raises(DataSpecError, match=r"no column 'body' \(its columns: text, label, n\)"):
        load_eval_set(_spec(f"datasets:{folder}:body", tok))
    with pytest.raises(DataSpecError, match=r"no column 'stars' \(its columns: text, label, n\)"):
        load_eval_set(_spec(f"datasets:{folder}:text:stars", tok))
    with pytest.raises(DataSpecError, match=r"'n' holds .*not text.*string columns: text\)"):
        load_eval_set(_spec(f"datasets:{folder}:n", tok))
    with pytest.raises(DataSpecError, match="does not exist"):
        load_eval_set(_spec(f"datasets:{tmp_path / 'nowhere'}:text", tok))
    with pytest.raises(DataSpecError, match=r"Use datasets:DIR:TEXT_FIELD"):
        DataSpec.parse(f"datasets:{folder}")


def test_cli_scans_a_causal_lm_on_a_datasets_folder(tmp_path: Path) -> None:
    model = hf_tiny.save("gpt2", tmp_path / "gpt2")
    text = hf_tiny.corpus()[:6000].split("\n\n")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": [t for t in text if t.strip()]}).save_to_disk(str(folder))
    out = tmp_path / "scan.json"
    assert main(["scan", "--model", f"hf:{model}", "--data", f"datasets:{folder}:text", "--task", "perplexity",
                 "--seq-len", "16", "--samples", "8", "--calib-samples", "4", "--methods", "weight_quant",
                 "--bits", "4g32", "--units", "*.h.1.mlp.*", "--out", str(out)]) == 0
    scan = json.loads(out.read_text())
    assert scan["data"]["spec"] == f"datasets:{folder}:text" and scan["data"]["kind"] == "datasets"
    assert scan["data"]["n"] == 8 and scan["results"]


def test_without_the_datasets_package_the_message_says_how_to_install_it(
        tok: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _save(_rows(6), tmp_path / "ds")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataSpecError, match="pip install datasets") as e:
        load_eval_set(_spec(f"datasets:{folder}:text", tok))
    assert str(e.value).startswith(f"datasets:{folder}:text") and "\n" not in str(e.value)
