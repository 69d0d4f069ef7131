"""The output's data-set card: `datasets.load_dataset(OUT)` reads the kept samples only, and a
README.md that bricks-dj did not write is never replaced."""

from __future__ import annotations

import pandas
import pyarrow.parquet as pq
import pytest

from bricks.engine.dataset_card import CARD, DESCRIPTIONS, MARKER, is_bricks_card
from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from bricks.engine.schema import BASE_COLUMNS

from conftest import read_manifest, read_rejects, read_shards

PROCESS = [{"shot_split": {}}, {"clip_length": {"min_frames": 15, "max_frames": 60}},
           {"motion_filter": {}}, {"middle_frame": {}}]


def run_into(corpus_dir, out, overwrite=False):
    return run(from_dict({"input": str(corpus_dir), "output": str(out), "executor": {"mode": "local"},
                          "process": PROCESS}), overwrite=overwrite)


@pytest.fixture(scope="module")
def output(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("card") / "out"
    run_into(corpus[0], out)
    return out


def test_datasets_loads_the_shards_and_not_the_rejects(output, tmp_path):
    datasets = pytest.importorskip("datasets")
    shards, rejects = read_shards(output), read_rejects(output)
    assert rejects is not None and rejects.num_rows > 0  # there is something to leave out
    train = datasets.load_dataset(str(output), cache_dir=str(tmp_path / "cache"))
    assert list(train) == ["train"]
    assert train["train"].num_rows == shards.num_rows
    assert train["train"].column_names == shards.schema.names
    assert sorted(train["train"]["sample_id"]) == sorted(shards.column("sample_id").to_pylist())


def test_pandas_reads_the_shards(output):
    frame = pandas.read_parquet(output / "shards")
    assert len(frame) == read_shards(output).num_rows
    assert list(frame.columns) == pq.read_schema(next((output / "shards").glob("*.parquet"))).names


def test_card_documents_the_columns_and_counts(output):
    text = (output / CARD).read_text()
    manifest = read_manifest(output)
    assert text.startswith(f"---\n{MARKER}\n") and is_bricks_card(text)
    assert manifest["dataset_card"] == {"written": True, "file": CARD}
    assert set(DESCRIPTIONS) == set(BASE_COLUMNS)
    for name, dtype in manifest["columns"].items():
        assert f"| `{name}` | {dtype} |" in text
    assert "| `flow` | double | written by `motion_filter` |" in text
    samples = manifest["samples"]
    assert f"{samples['total']} samples ({samples['video']} video clips, {samples['image']} images)" in text
    assert f"{manifest['rejects']['dropped']} dropped" in text
    assert "reference mode" in text


def test_a_readme_of_others_is_never_replaced(tmp_path, corpus, caplog):
    out = tmp_path / "out"
    run_into(corpus[0], out)
    mine = "# My notes\n\nThese clips are for the spring fine-tune.\n"
    (out / CARD).write_text(mine)
    manifest = run_into(corpus[0], out)  # resumed: nothing to do, the manifest is written again
    assert (out / CARD).read_text() == mine
    assert manifest["dataset_card"]["written"] is False
    assert "was not written by bricks-dj" in caplog.text
    assert read_manifest(out)["dataset_card"] == manifest["dataset_card"]
    run_into(corpus[0], out, overwrite=True)
    assert (out / CARD).read_text() == mine


def test_an_edited_card_without_the_marker_is_kept(tmp_path, corpus):
    out = tmp_path / "out"
    run_into(corpus[0], out)
    edited = (out / CARD).read_text().replace(MARKER + "\n", "").replace("# Video-text", "# Our video-text")
    (out / CARD).write_text(edited)
    run_into(corpus[0], out, overwrite=True)
    assert (out / CARD).read_text() == edited


def test_overwrite_and_resume_accept_bricks_card(tmp_path, corpus):
    out = tmp_path / "out"
    run_into(corpus[0], out)
    first = (out / CARD).read_text()
    run_into(corpus[0], out)  # the card does not make the folder foreign
    run_into(corpus[0], out, overwrite=True)
    assert is_bricks_card((out / CARD).read_text())
    assert (out / CARD).read_text().split("## Columns")[1] == first.split("## Columns")[1]


def test_card_on_s3(s3, corpus):
    out = s3.uri("runs/card")
    run_into(corpus[0], out)
    assert is_bricks_card(s3.fs.cat_file(f"{s3.bucket}/runs/card/{CARD}").decode())
