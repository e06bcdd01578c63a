"""Carvana_UNet.ipynb: committed without outputs; "Run all" trains the demo headlessly; the Kaggle step unzips."""
import ast
import json
import os
import shutil
import sys
import zipfile

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT

NOTEBOOK = ROOT / "Carvana_UNet.ipynb"
# The settings cell's documented override: a seconds-long demo run.
SMALL = {"NUM_EPOCHS": 1, "FEATURES": [4, 8], "IMAGE_HEIGHT": 32, "IMAGE_WIDTH": 48, "BATCH_SIZE": 16}


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 6
    assert [cell.outputs for cell in code] == [[]] * len(code)
    assert [cell.execution_count for cell in code] == [None] * len(code)


def test_the_notebook_fetches_every_module_that_train_and_predict_import():
    """A Colab session that holds only the notebook's `needed` files must be able to import both scripts."""
    cell = next(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if "needed = [" in cell.source)
    listed = set(ast.literal_eval(cell[cell.index("["):cell.index("]") + 1]))
    local = {path.stem for path in ROOT.glob("*.py")}
    imported, waiting = set(), ["train", "predict"]
    while waiting:
        tree = ast.parse((ROOT / f"{waiting.pop()}.py").read_text())
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in set(names) & local - imported:
                imported.add(name)
                waiting.append(name)
    assert {f"{name}.py" for name in imported | {"train", "predict"}} <= listed


def run_notebook(folder, until=None):
    """Execute the notebook (or its cells up to the one holding `until`) in folder; the executed cells."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    if until:
        notebook.cells = notebook.cells[:1 + next(i for i, cell in enumerate(notebook.cells) if until in cell.source)]
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return notebook.cells


def copy_repository(tmp_path):
    """The notebook and the code beside it in tmp_path/repository, so that nothing lands in the real tree."""
    repository = tmp_path / "repository"
    repository.mkdir()
    for path in [*ROOT.glob("*.py"), ROOT / "requirements.txt", NOTEBOOK]:
        shutil.copy(path, repository)
    return repository


def outputs(cells, kind):
    """Every output of one kind: 'image/png' pictures, or 'text' for printed lines."""
    found = []
    for cell in cells:
        for output in cell.get("outputs", []):
            if kind == "text" and output.get("name") == "stdout":
                found.append(output["text"])
            elif kind in output.get("data", {}):
                found.append(output["data"][kind])
    return found


def test_run_all_trains_the_demo_then_a_rerun_continues(tmp_path, monkeypatch):
    repository = copy_repository(tmp_path)
    monkeypatch.setenv("CARVANA_NOTEBOOK_SETTINGS", json.dumps(SMALL))

    cells = run_notebook(repository)  # raises CellExecutionError, naming the cell, if any cell fails
    assert not [output for cell in cells for output in cell.get("outputs", []) if output["output_type"] == "error"]
    warned = [output["text"] for cell in cells for output in cell.get("outputs", []) if output.get("name") == "stderr"]
    assert not [text for text in warned if "Warning" in text], warned  # TqdmWarning: IProgress not found, say
    assert (repository / "checkpoints" / "best.pt").is_file()
    assert (repository / "data" / "synthetic" / "train").is_dir()  # no data: the demo ran
    printed = "".join(outputs(cells, "text"))
    assert "mixed precision" in printed and "not on Colab" in printed and "no kaggle.json" in printed
    assert "--FEATURES=4,8" in printed and "--NUM_EPOCHS=1" in printed and "--DATA_DIR" not in printed
    assert "LOAD_MODEL" not in printed
    assert "MAKE_SUBMISSION is False" in printed
    assert len(outputs(cells, "image/png")) >= 2  # curves, predictions, worst images
    assert len(outputs(cells, "image/jpeg")) >= 1  # full-resolution overlays
    assert len(list((repository / "saved_images" / "checkpoints").glob("predictions_epoch1/*_mask.png"))) >= 1

    # After a disconnect: Run all again continues from last.pt instead of starting over.
    printed = "".join(outputs(run_notebook(repository), "text"))
    assert "last.pt exists: continuing that run (--LOAD_MODEL=true)" in printed
    assert "resumed from" in printed

    # Other settings are another run: it goes to a folder of its own and the first run is kept.
    before = (repository / "checkpoints" / "last.pt").read_bytes()
    monkeypatch.setenv("CARVANA_NOTEBOOK_SETTINGS", json.dumps({**SMALL, "FEATURES": [4, 8, 8]}))
    printed = "".join(outputs(run_notebook(repository), "text"))
    assert "holds another run (FEATURES differ): this run goes to checkpoints-2/" in printed
    assert (repository / "checkpoints-2" / "last.pt").is_file()
    assert (repository / "checkpoints" / "last.pt").read_bytes() == before


def test_notebook_opened_alone_says_what_to_do(tmp_path):
    shutil.copy(NOTEBOOK, tmp_path)  # no code beside it and no REPOSITORY set
    with pytest.raises(CellExecutionError, match="set REPOSITORY in the settings cell"):
        run_notebook(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Carvana_UNet.ipynb"]


FAKE_KAGGLE = """#!{python}
import os, shutil, sys
# Stands in for the kaggle CLI: needs the token, copies the competition's file from {source}.
assert os.path.isfile(os.path.join(os.environ["KAGGLE_CONFIG_DIR"], "kaggle.json")), "no kaggle.json"
arguments = sys.argv[1:]
assert arguments[:4] == ["competitions", "download", "-c", "carvana-image-masking-challenge"], arguments
shutil.copy(os.path.join("{source}", arguments[arguments.index("-f") + 1]), arguments[arguments.index("-p") + 1])
"""


def test_kaggle_step_downloads_and_unzips_the_data(tmp_path, monkeypatch, synthetic_root):
    competition = tmp_path / "competition"  # train.zip and train_masks.zip as Kaggle serves them
    competition.mkdir()
    for name in ("train", "train_masks"):
        with zipfile.ZipFile(competition / f"{name}.zip", "w") as archive:
            for path in sorted((synthetic_root / name).iterdir()):
                archive.write(path, f"{name}/{path.name}")
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "kaggle").write_text(FAKE_KAGGLE.format(python=sys.executable, source=competition))
    (bin_folder / "kaggle").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    repository = copy_repository(tmp_path)
    (repository / "kaggle.json").write_text('{"username": "someone", "key": "0"}')

    printed = "".join(outputs(run_notebook(repository, until="def kaggle_download"), "text"))
    assert "Carvana data in data/: 16 training photos" in printed
    for name in ("train", "train_masks"):
        assert sorted(p.name for p in (repository / "data" / name).iterdir()) == \
            sorted(p.name for p in (synthetic_root / name).iterdir())
    assert sorted(p.name for p in (repository / "data").iterdir()) == ["train", "train_masks"]  # zips removed


def test_the_settings_cell_starts_from_train_py_defaults():
    """Values equal to train.py's are not passed on, so a stale copy would silently override the demo's."""
    import train

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(cell.source for cell in notebook.cells if "MORE_SETTINGS = {}" in cell.source)
    values = {}
    exec(cell.split("# Unattended runs")[0], {}, values)  # noqa: S102  (our own committed cell)
    for name, value in values.items():
        if name in train.defaults():
            assert value == train.defaults()[name], name
