"""Ordinary mistakes and interruptions: one line, the right exit status, nothing lost."""
import shutil

import cv2
import pytest
import torch

import predict
import train
from conftest import damage, read_only, split_of, tiny_args
from utils import load_checkpoint, save_checkpoint


def predicting(trained, *extra):
    return ["--checkpoint", str(trained[0] / "checkpoints" / "best.pt"), "--workers", "0", *extra]


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("error: "), err
    return err


def test_a_submission_resumed_with_another_checkpoint_is_refused(trained, synthetic_root, tmp_path, capsys):
    submission = tmp_path / "sub.csv"
    args = predicting(trained, "--input", str(synthetic_root / "train"), "--submission", str(submission), "--no-images")
    assert predict.main(args) == 0
    before = submission.read_bytes()
    other = load_checkpoint(trained[0] / "checkpoints" / "best.pt")
    other["model"] = {name: value + 0.01 if value.is_floating_point() else value for name, value in other["model"].items()}
    save_checkpoint(other, tmp_path / "retrained.pt")
    capsys.readouterr()
    args[1] = str(tmp_path / "retrained.pt")
    with pytest.raises(SystemExit, match=r"holds rows made with another model .*would mix two models"):
        predict.main([*args, "--resume"])
    with pytest.raises(SystemExit, match=r"another threshold"):
        predict.main([*predicting(trained, "--input", str(synthetic_root / "train"), "--submission", str(submission),
                                  "--no-images", "--threshold", "0.3"), "--resume"])
    assert submission.read_bytes() == before
    assert predict.main([*predicting(trained, "--input", str(synthetic_root / "train"), "--submission",
                                     str(submission), "--no-images"), "--resume"]) == 0  # the same model: fine
    assert submission.read_bytes() == before


def test_a_cut_row_is_dropped_by_an_atomic_replacement_that_a_kill_cannot_harm(trained, synthetic_root, tmp_path,
                                                                               monkeypatch, capsys):
    submission = tmp_path / "sub.csv"
    args = predicting(trained, "--input", str(synthetic_root / "train"), "--submission", str(submission), "--no-images")
    assert predict.main(args) == 0
    lines = submission.read_text().splitlines(keepends=True)
    submission.write_text("".join(lines[:6]) + lines[6][:9])  # killed mid-row
    cut = submission.read_bytes()

    def killed(*arguments):
        raise KeyboardInterrupt  # dies while copying the complete rows

    monkeypatch.setattr("submission.shutil.copyfileobj", killed)
    with pytest.raises(KeyboardInterrupt):
        predict.main([*args, "--resume"])
    assert submission.read_bytes() == cut  # the file as it was: every complete row kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv", "sub.csv.source"]  # no temporary left
    monkeypatch.undo()
    assert predict.main([*args, "--resume"]) == 0
    assert submission.read_text().splitlines(keepends=True)[:6] == lines[:6]
    assert sorted(submission.read_text().splitlines()) == sorted(line.rstrip("\n") for line in lines)


def test_names_that_cannot_be_a_csv_field_are_refused(trained, synthetic_root, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    image = min((synthetic_root / "train").iterdir())
    shutil.copy(image, folder / "a,b.jpg")
    shutil.copy(image, folder / "plain.jpg")
    status = predict.main(predicting(trained, "--input", str(folder), "--submission", str(tmp_path / "s.csv"),
                                     "--no-images"))
    assert status == 1 and "'a,b.jpg'" in one_line_error(capsys) and not (tmp_path / "s.csv").exists()


def test_unreadable_inputs_make_a_submission_fail_loudly(trained, synthetic_root, tmp_path, capsys):
    folder = tmp_path / "in"
    shutil.copytree(synthetic_root / "train", folder)
    (folder / "broken.jpg").write_bytes(b"")
    status = predict.main(predicting(trained, "--input", str(folder), "--submission", str(tmp_path / "s.csv"),
                                     "--no-images"))
    captured = capsys.readouterr()
    assert status == 1 and "submission: " in captured.out and "(16 rows)" in captured.out
    assert "1 input(s) could not be read" in captured.err and "lacks the rows of the 1 skipped" in captured.err


CHECKPOINT_PROBLEMS = {"other-model": "this project's UNet", "nan-weights": "NaN or infinite",
                       "damaged": "is damaged: archive/data/", "folder": "is a folder, not a checkpoint file"}


@pytest.mark.parametrize("case", CHECKPOINT_PROBLEMS)
def test_checkpoints_that_cannot_predict_are_one_line_errors(trained, synthetic_root, tmp_path, capsys, case):
    state = load_checkpoint(trained[0] / "checkpoints" / "best.pt")
    if case == "other-model":
        state["model_args"] = {"n_channels": 3, "n_classes": 1}  # another repository's UNet
    elif case == "nan-weights":
        state["model"] = {name: value * float("nan") if value.is_floating_point() else value
                          for name, value in state["model"].items()}
    if case == "folder":
        (tmp_path / "x.pt").mkdir()
    else:
        save_checkpoint(state, tmp_path / "x.pt")
    if case == "damaged":
        damage(tmp_path / "x.pt")  # 4 bytes inside a weight: the model would load, its masks wrong
    status = predict.main(["--checkpoint", str(tmp_path / "x.pt"), "--input", str(synthetic_root / "train"),
                           "--output", str(tmp_path / "out"), "--workers", "0"])
    err = one_line_error(capsys)
    assert status == 2 and str(tmp_path / "x.pt") in err and CHECKPOINT_PROBLEMS[case] in err
    assert not (tmp_path / "out").exists()


def test_output_paths_that_cannot_be_written_are_one_line_errors(trained, synthetic_root, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    inputs = ["--input", str(synthetic_root / "train")]
    assert predict.main(predicting(trained, *inputs, "--output", str(tmp_path / "taken"))) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert predict.main(predicting(trained, *inputs, "--submission", str(tmp_path), "--no-images")) == 2
    assert "is a folder: name the CSV file" in one_line_error(capsys)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_lists_saved_by_windows_editors_are_read_whole(trained, synthetic_root, tmp_path, capsys, encoding):
    names = sorted(path.name for path in (synthetic_root / "train").iterdir())[:3]
    listing = tmp_path / "list.txt"
    listing.write_text("\r\n".join(str(synthetic_root / "train" / name) for name in names), encoding=encoding)
    assert predict.main(predicting(trained, "--input", str(listing), "--output", str(tmp_path / "out"))) == 0
    assert len(list((tmp_path / "out").glob("*_mask.png"))) == 3


def test_a_list_that_is_not_text_is_a_one_line_error(trained, tmp_path, capsys):
    (tmp_path / "list.txt").write_bytes(b"\x80\x81\xfe binary")
    assert predict.main(predicting(trained, "--input", str(tmp_path / "list.txt"))) == 2
    assert "not a text list of image paths" in one_line_error(capsys)


def test_a_resume_from_non_finite_weights_is_refused_naming_the_file(tmp_path, synthetic_root):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["training_model"] = {name: torch.full_like(value, float("nan")) if value.is_floating_point() else value
                               for name, value in state["training_model"].items()}
    save_checkpoint(state, last)
    with pytest.raises(SystemExit, match=r"cannot resume .*last.pt holds NaN or infinite weights") as error:
        train.main([*tiny_args(tmp_path, synthetic_root, 2), "--LOAD_MODEL=true"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["CHECKPOINT_DIR", "SAVED_IMAGES"])
def test_a_folder_setting_that_names_a_file_stops_before_training(tmp_path, synthetic_root, name):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit, match=rf"{name}: .*taken is a file") as error:
        train.main([*tiny_args(tmp_path, synthetic_root, 1), f"--{name}={tmp_path / 'taken'}"])
    assert "\n" not in str(error.value) and not (tmp_path / "checkpoints").exists()


def test_a_full_disk_at_a_save_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_root, monkeypatch):
    import errno

    import utils

    train.main(tiny_args(tmp_path, synthetic_root, 1))
    real = utils.torch.save

    def full(state, stream):
        real(state, stream)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.torch, "save", full)
    with pytest.raises(SystemExit, match=r"cannot save epoch 2 .*No space left on device.*last good checkpoint is "
                                         r".*\.pt.*--LOAD_MODEL=true") as error:
        train.main([*tiny_args(tmp_path, synthetic_root, 2), "--LOAD_MODEL=true"])
    assert "\n" not in str(error.value)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_a_one_pixel_bottleneck_is_refused_up_front():
    with pytest.raises(SystemExit, match=r"4x4 leaves the 2-level UNet's bottleneck one pixel.*at least 8"):
        train.parse_settings(["--IMAGE_HEIGHT=4", "--IMAGE_WIDTH=4", "--BATCH_SIZE=3", "--FEATURES=4,8"])
    train.parse_settings(["--IMAGE_HEIGHT=4", "--IMAGE_WIDTH=8", "--BATCH_SIZE=3", "--FEATURES=4,8"])


def camera_named_folder(tmp_path, synthetic_root):
    """The synthetic photos renamed as two cameras name them: IMG_0001.jpg ... and DSC_0045.jpg ..."""
    import synthetic

    source = tmp_path / "source"
    synthetic.make_synthetic(source, cars=16, angles=4, size=(96, 64), progress=False)
    root = tmp_path / "camera"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for number, image in enumerate(sorted((source / "train").glob("*.jpg")), 1):
        name = f"{'IMG' if number <= 44 else 'DSC'}_{number:04d}"
        shutil.copy(image, root / "images" / f"{name}.jpg")
        shutil.copy(source / "train_masks" / f"{image.stem}_mask.gif", root / "masks" / f"{name}.gif")
    return root


def test_camera_names_are_split_by_photo_with_a_warning(tmp_path, synthetic_root, capsys):
    root = camera_named_folder(tmp_path, synthetic_root)
    config = {**train.defaults(), "DATA_DIR": str(root), "CACHE_DIR": "", "VAL_FRACTION": 0.2}
    for seed in (1, 2, 3):
        training, validation = split_of({**config, "SEED": seed})
        assert len(validation) in (12, 13) and len(training) + len(validation) == 64
    err = capsys.readouterr().err
    assert "64 of the 64 photos in" in err and "have no car id in their names (DSC_0045.jpg" in err


def test_a_second_mask_and_a_broken_link_are_named_not_ignored(tmp_path, synthetic_root):
    import data_folder

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    mask = min((root / "train_masks").glob("*.gif"))
    shutil.copy(mask, mask.with_suffix(".GIF"))
    (root / "train" / "moved.jpg").symlink_to(tmp_path / "elsewhere" / "moved.jpg")
    samples, problems = data_folder.scan_pairs(root / "train", root / "train_masks", progress=False)
    reasons = {path.name: reason for path, reason in problems.skipped}
    assert reasons[mask.with_suffix(".GIF").name] == f"not used: {mask.stem.removesuffix('_mask')}.jpg has another mask, {mask.name}"
    assert reasons["moved.jpg"].startswith("a symbolic link to ") and reasons["moved.jpg"].endswith("which does not exist")
    assert len(samples) == 16



def test_two_photos_claiming_one_mask_are_reported_and_neither_is_trained(tmp_path, synthetic_root, capsys):
    import cv2

    import data_folder

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    photos = sorted((root / "train").glob("*.jpg"))
    claimed, other_car = photos[0], photos[-1]
    cv2.imwrite(str(claimed.with_suffix(".png")), cv2.imread(str(other_car)))  # another car's photo, the same stem
    samples, report = data_folder.scan_pairs(root / "train", root / "train_masks", progress=False)
    reasons = {path.name: reason for path, reason in report.skipped}
    mask = f"{claimed.stem}_mask.gif"
    assert reasons[claimed.name] == f"its mask {mask} is also the mask of {claimed.stem}.png: rename the photo that is not its own"
    assert reasons[f"{claimed.stem}.png"].startswith(f"its mask {mask} is also the mask of {claimed.name}")
    assert len(samples) == 15 and claimed.stem not in {sample.image.stem for sample in samples}
    data_folder.print_report(report)
    assert f"{claimed.name}: its mask {mask}" in capsys.readouterr().err

def test_outputs_on_a_read_only_mount_are_one_line_errors_before_anything_is_predicted(trained, synthetic_root,
                                                                                     tmp_path, monkeypatch, capsys):
    inputs = ["--input", str(synthetic_root / "train")]
    (tmp_path / "mount").mkdir()
    read_only(monkeypatch, tmp_path / "mount")
    assert predict.main(predicting(trained, *inputs, "--output", str(tmp_path / "mount"))) == 2
    assert one_line_error(capsys) == f"error: --output {tmp_path / 'mount'}: cannot write there (Read-only file system)"
    assert predict.main(predicting(trained, *inputs, "--output", str(tmp_path / "mount" / "new"))) == 2
    assert "cannot write there (Read-only file system)" in one_line_error(capsys)
    submission = tmp_path / "mount" / "sub.csv"
    assert predict.main(predicting(trained, *inputs, "--submission", str(submission), "--no-images")) == 2
    assert f"--submission {submission}: cannot write there (Read-only file system)" in one_line_error(capsys)
    assert sorted(path.name for path in (tmp_path / "mount").iterdir()) == []


def test_a_full_disk_while_writing_masks_is_an_error_and_every_file_written_is_whole(trained, synthetic_root,
                                                                                   tmp_path, monkeypatch, capsys):
    import errno

    real, written = predict.write_bytes, []

    def filling_up(path, data):
        if len(written) == 5:  # the sixth file does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
        written.append(path)

    monkeypatch.setattr(predict, "write_bytes", filling_up)
    output = tmp_path / "out"
    assert predict.main(predicting(trained, "--input", str(synthetic_root / "train"), "--output", str(output))) == 2
    captured = capsys.readouterr()
    assert "wrote" not in captured.out and "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1].startswith("error: cannot write ") and "No space left" in captured.err
    assert sorted(path.name for path in output.iterdir()) == sorted([".source", *(path.name for path in written)])
    for path in written:  # whole: each decodes
        assert cv2.imread(str(path)) is not None


def test_a_full_disk_in_a_submission_is_one_line_and_resume_finishes_it(trained, synthetic_root, tmp_path,
                                                                         monkeypatch, capsys):
    import errno
    import io

    import submission as submission_module

    class FillingUp(io.TextIOWrapper):
        rows = 0

        def write(self, text):
            FillingUp.rows += 1
            if FillingUp.rows > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(text)

    def opening(path, mode, **kwargs):  # the appending stream of the rows, on a disk that fills up
        assert mode == "a"
        return FillingUp(open(path, "ab"), line_buffering=True)

    monkeypatch.setattr(submission_module, "open", opening, raising=False)
    path = tmp_path / "sub.csv"
    args = predicting(trained, "--input", str(synthetic_root / "train"), "--submission", str(path), "--no-images")
    assert predict.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: cannot write {path} (No space left on device); its complete rows are kept; the same command with "
        f"--resume finishes {path}")
    monkeypatch.undo()
    assert predict.main([*args, "--resume"]) == 0
    rows = path.read_text().splitlines()
    assert rows[0] == "img,rle_mask" and len(rows) == 17 and len({row.split(",")[0] for row in rows}) == 17


@pytest.mark.parametrize("start", ["empty", "rows without a header"])
def test_a_submission_without_its_header_gets_it_back_on_resume(trained, synthetic_root, tmp_path, capsys, start):
    path = tmp_path / "sub.csv"
    args = predicting(trained, "--input", str(synthetic_root / "train"), "--submission", str(path), "--no-images")
    assert predict.main(args) == 0
    complete = path.read_text().splitlines()
    path.write_text("" if start == "empty" else "\n".join(complete[1:6]) + "\n")  # as a full disk left it
    assert predict.main([*args, "--resume"]) == 0
    rows = path.read_text().splitlines()
    assert rows[0] == "img,rle_mask" and sorted(rows) == sorted(complete)


def test_a_second_submission_writer_is_refused_naming_the_first(trained, synthetic_root, tmp_path, capsys):
    import signal

    from test_locks import holder

    path = tmp_path / "sub.csv"
    args = predicting(trained, "--input", str(synthetic_root / "train"), "--submission", str(path), "--no-images")
    first = holder(path)  # another process writing it
    try:
        assert predict.main(args) == 2
        assert f"--submission: {path} is in use by process {first.pid}" in one_line_error(capsys)
        assert not path.exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert predict.main(args) == 0  # the killed writer's lock blocks nobody
    assert len(path.read_text().splitlines()) == 17


def test_outputs_stay_under_output_whatever_the_input_paths():
    from pathlib import Path

    names = predict.output_names([Path("/bk_car.jpg"), Path("/photos/bk_car.jpg"), Path("/photos/car.png")])
    assert names[Path("/photos/car.png")] == "car" and len(set(names.values())) == 3
    for name in names.values():
        assert not Path(name).is_absolute() and "/" not in name


def test_each_model_masks_go_to_a_folder_of_their_own(trained, synthetic_root, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained[0] / "checkpoints", tmp_path / "run" / "checkpoints")
    image = str(min((synthetic_root / "train").iterdir()))
    for name in ("best", "last"):
        assert predict.main(["--checkpoint", f"run/checkpoints/{name}.pt", "--input", image, "--workers", "0"]) == 0
        assert f"to saved_images/run/checkpoints/{name}_predictions/" in capsys.readouterr().out
    other = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    other["model"] = {name: value * 1.01 if value.is_floating_point() else value for name, value in other["model"].items()}
    save_checkpoint(other, tmp_path / "other.pt")
    output = tmp_path / "saved_images" / "run" / "checkpoints" / "best_predictions"
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    assert predict.main(["--checkpoint", "other.pt", "--input", image, "--workers", "0", "--output", str(output)]) == 2
    assert f"--output {output} holds the masks of another model (by run/checkpoints/best.pt)" in one_line_error(capsys)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before


def test_a_misspelt_masks_folder_or_missing_option_is_one_line_exit_2(trained, synthetic_root, tmp_path, capsys):
    inputs = ["--input", str(synthetic_root / "train"), "--output", str(tmp_path / "out")]
    assert predict.main(predicting(trained, *inputs, "--masks", str(synthetic_root / "train_mask"))) == 2
    assert one_line_error(capsys) == f"error: --masks {synthetic_root / 'train_mask'}: no such folder"
    (tmp_path / "other_masks").mkdir()
    (tmp_path / "other_masks" / "another_car_mask.gif").write_bytes((synthetic_root / "train_masks").iterdir().__next__()
                                                                    .read_bytes())
    assert predict.main(predicting(trained, *inputs, "--masks", str(tmp_path / "other_masks"))) == 2
    assert "holds no mask of these 16 images" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as stopped:
        predict.main(["--checkpoint", str(trained[0] / "checkpoints" / "best.pt")])
    assert stopped.value.code == 2
    assert one_line_error(capsys).startswith("error: the following arguments are required: --input")


def test_ctrl_c_during_training_is_one_line_with_the_resume_hint(tmp_path, synthetic_root):
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    arguments = [*tiny_args(tmp_path, synthetic_root, 200), "--NUM_WORKERS=1", "--CACHE_DIR="]  # loader processes
    run = subprocess.Popen([sys.executable, "-u", "train.py", *arguments], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert any(line.startswith("epoch 2/200") for line in iter(run.stdout.readline, ""))
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C reaches every process of the terminal's group
        err = run.communicate(timeout=60)[1]
    finally:
        run.kill()
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("epoch ")]
    assert run.returncode == 130 and "Traceback" not in err, err
    hint = (f"interrupted: the last good checkpoint is {tmp_path / 'checkpoints' / 'last.pt'}; the same command with "
            f"--LOAD_MODEL=true continues the run")
    assert lines == [hint], err


def test_ctrl_c_while_a_checkpoint_is_written_stays_a_ctrl_c_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch.save's zip writer turns a KeyboardInterrupt into "RuntimeError: unexpected pos" (seen when a
    run was stopped during its last.pt): it must reach train.py's one-line Ctrl-C handler as itself."""
    import torch

    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")

    def interrupted_save(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt"]
