"""Misused commands answer with one line naming the problem, exit 2, and print no traceback.

Each case is what a careless or hostile user types: missing or junk files, a database file that
is not a database, a mistyped --data-dir, numbers that are NaN, infinite, negative or huge,
devices the machine does not have. None of them may start work (they fail before any training).
"""

from __future__ import annotations

import pytest
from test_service_api import assets  # noqa: F401  (a fixture: a tiny checkpoint, images)

from feedbackcam.cli import main

# {junk_db}: a data dir whose feedbackcam.db is random bytes; {store}: a real, empty store;
# {nowhere}: a path that does not exist; {junk}: a file of random bytes; {ckpt}: a real
# checkpoint; {img}: a real PNG; {empty}: an empty folder; {file}: a text file.
CASES = [
    # the app's store
    "export --data-dir {junk_db} --out {nowhere}/out",
    "users add bob --role viewer --data-dir {junk_db}",
    "users list --data-dir {junk_db}",
    "users revoke bob --data-dir {junk_db}",
    "worklist list --data-dir {junk_db}",
    "worklist add {empty} --data-dir {junk_db}",
    "users list --data-dir {nowhere}",
    "users revoke bob --data-dir {nowhere}",
    "worklist list --data-dir {nowhere}",
    "worklist add {empty} --data-dir {nowhere}",
    "export --data-dir {nowhere} --out {nowhere}/out",
    "doctor --data-dir {nowhere}",
    "doctor --data-dir {empty}",
    "users revoke nobody --data-dir {store}",
    "users add bob --role viewer --days 1e999 --data-dir {store}",
    "users add bob --role viewer --days nan --data-dir {store}",
    "users add bob --role viewer --days -1 --data-dir {store}",
    "users add bob --role viewer --days 0 --data-dir {store}",
    "users add bob --role viewer --days 1e6 --data-dir {store}",
    "users add bob --role emperor --data-dir {store}",
    "users add b/o/b --role viewer --data-dir {store}",
    "users add bob --role viewer --db postgresql://u:secret@127.0.0.1:1/none",
    "users list --db notaurl",
    "users list --db mysql://u@127.0.0.1:1/x",
    "worklist add {nowhere} --data-dir {store}",
    "worklist add {file} --data-dir {store}",
    "worklist add {empty} --data-dir {store} --order suspicious",
    "worklist add {empty} --data-dir {store} --order suspicious --model {junk}",
    "worklist add {empty} --data-dir {store} --order suspicious --model {ckpt} --masks {nowhere}",
    "worklist add {empty} --data-dir {store} --order sideways",
    "export --data-dir {store} --out {file}",
    # serve: everything checked before the port is bound or a model trained
    "serve --device bogus --data-dir {nowhere}",
    "serve --device cuda --data-dir {nowhere}",
    "serve --device cuda:7 --data-dir {nowhere}",
    "serve --device tpu --data-dir {nowhere}",
    "serve --device meta --data-dir {nowhere}",
    "serve --tolerance nan --data-dir {nowhere}",
    "serve --tolerance inf --data-dir {nowhere}",
    "serve --lr nan --data-dir {nowhere}",
    "serve --lr 0 --data-dir {nowhere}",
    "serve --lr -1 --data-dir {nowhere}",
    "serve --max-upload-mb nan --data-dir {nowhere}",
    "serve --max-upload-mb -5 --data-dir {nowhere}",
    "serve --low-confidence nan --data-dir {nowhere}",
    "serve --low-confidence 2 --data-dir {nowhere}",
    "serve --unfamiliar-quantile -1 --data-dir {nowhere}",
    "serve --update-every 0 --data-dir {nowhere}",
    "serve --steps -3 --data-dir {nowhere}",
    "serve --replay-per-class -1 --data-dir {nowhere}",
    "serve --max-concurrent 0 --data-dir {nowhere}",
    "serve --rate-limit -1 --data-dir {nowhere}",
    "serve --port 99999",
    "serve --port http",
    "serve --model {nowhere}/model.pt --data-dir {nowhere}",
    "serve --model {junk} --data-dir {nowhere}",
    "serve --model {empty} --data-dir {nowhere}",
    "serve --lambda nan --data-dir {nowhere}",
    "serve --lambda 2 --data-dir {nowhere}",
    "serve --data-dir {junk_db}",
    # data
    "data check {nowhere}",
    "data check {file}",
    "data check {empty}",
    "data prepare {nowhere} --out {nowhere}/p",
    "data prepare {empty} --out {nowhere}/p",
    "data prepare {empty} --out {file}",
    "data prepare {empty} --size 0 --out {nowhere}/p",
    "data prepare {empty} --size -5 --out {nowhere}/p",
    "data check {empty} --labels {nowhere}/labels.csv",
    "data check {empty} --labels {junk}",
    "data prepare {empty} --layout isic2019 --out {nowhere}/p",
    # training, evaluation, explanation
    "train-base --data {nowhere} --out {nowhere}/m.pt",
    "train-base --data {empty} --out {nowhere}/m.pt",
    "train-base --data {file} --out {nowhere}/m.pt",
    "train-base --data {empty} --out {nowhere}/m.pt --epochs -1",
    "train-base --data {empty} --out {nowhere}/m.pt --lr nan",
    "train-base --data {empty} --out {nowhere}/m.pt --device bogus",
    "train-base --data {empty} --out {nowhere}/m.pt --weights {nowhere}/w.pt",
    "train-base --data {empty} --out {nowhere}/m.pt --model nosuchnet",
    "evaluate --model {nowhere}/m.pt --data {empty} --out {nowhere}/e",
    "evaluate --model {junk} --data {empty} --out {nowhere}/e",
    "evaluate --model {ckpt} --data {nowhere} --out {nowhere}/e",
    "evaluate --model {ckpt} --data {empty} --out {nowhere}/e",
    "evaluate --model {ckpt} --data {empty} --out {nowhere}/e --threshold nan",
    "evaluate --model {ckpt} --data {empty} --out {nowhere}/e --artifacts {junk}",
    "evaluate --model {ckpt} --data {empty} --out {nowhere}/e --device bogus",
    "explain {nowhere}/a.png --model {ckpt} --out {nowhere}/o.png",
    "explain {junk} --model {ckpt} --out {nowhere}/o.png",
    "explain {img} --model {junk} --out {nowhere}/o.png",
    "explain {img} --model {nowhere}/m.pt --out {nowhere}/o.png",
    "explain {img} --model {ckpt} --out {empty}",
    "import-keras {nowhere}/m.h5 --out {nowhere}/m.pt",
    "import-keras {junk} --out {nowhere}/m.pt",
    "propagate --data {nowhere} --marks {nowhere} --out {nowhere}/p",
    "propagate --data {empty} --marks {empty} --out {nowhere}/p --model {junk}",
    "propagate --data {empty} --marks {empty} --out {nowhere}/p --threshold nan",
    "clusters --data {nowhere} --model {ckpt} --out {nowhere}/c",
    "clusters --data {empty} --model {junk} --out {nowhere}/c",
    "clusters --data {empty} --model {ckpt} --out {nowhere}/c --clusters 0",
    # simulations
    "simulate --data {nowhere}",
    "simulate --data {file}",
    "simulate --lambda nan --data {empty}",
    "simulate --lambda -1 --data {empty}",
    "simulate --modes nonsense --data {empty}",
    "simulate --base-model {junk} --data {empty}",
    "shortcuts --datasets isic-real --artifacts-root {nowhere}",
    "shortcuts --seeds -1 --datasets decoy --lams nan",
    "demo --out {file}",
    "users add bob --role viewer --days inf --data-dir {store}",
    "worklist add {empty} --data-dir {store} --order suspicious --model {nowhere}/m.pt",
    "serve --model {ckpt} --device cuda --data-dir {nowhere}",
    "evaluate --model {ckpt} --data {empty} --out {file}",
    "explain {file} --model {ckpt} --out {nowhere}/o.png",
]


@pytest.fixture
def places(tmp_path, assets):  # noqa: F811
    import os

    junk_db = tmp_path / "junk-store"
    junk_db.mkdir()
    (junk_db / "feedbackcam.db").write_bytes(os.urandom(5000))
    store = tmp_path / "store"
    assert main(["users", "add", "first", "--role", "admin", "--data-dir", str(store)]) == 0
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(3000))
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "file.txt"
    text.write_text("not what was asked for\n")
    img = tmp_path / "lesion.png"
    from PIL import Image

    Image.fromarray(assets["images"][0]).save(img)
    return {
        "junk_db": junk_db,
        "store": store,
        "nowhere": tmp_path / "nowhere",
        "junk": junk,
        "ckpt": assets["checkpoint"],
        "img": img,
        "empty": empty,
        "file": text,
    }


def test_doctor_reports_a_junk_database_as_a_problem(places, capsys):
    assert main(["doctor", "--data-dir", str(places["junk_db"])]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM   database" in out and "not a database" in out


def test_the_list_is_long_enough():
    assert len(CASES) >= 109 and len(set(CASES)) == len(CASES)


@pytest.mark.parametrize("case", CASES)
def test_misuse_is_one_line_exit_2_and_no_traceback(case, places, capsys):
    argv = [part.format(**places) for part in case.split()]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err, captured.err
    assert code == 2, (code, captured.out[-500:], captured.err[-500:])
    first = captured.err.strip().splitlines()[0] if captured.err.strip() else ""
    assert first.startswith(("feedbackcam", "usage:")), captured.err
    assert "error" in captured.err, captured.err
    assert "secret" not in captured.err
    assert not places["nowhere"].exists(), "a refused command created its --data-dir or --out"


def test_help_shows_defaults_but_never_default_none():
    """Every option's help ends with its default, help text or not, except where the default
    is None: there the help says what happens ("(default: None)" after "default: 0.8 with the
    offline network" reads as a contradiction)."""
    import argparse

    from feedbackcam.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts = {name: " ".join(p.format_help().split()) for name, p in sub.choices.items()}
    assert not [name for name, text in texts.items() if "(default: None)" in text]
    assert "(default: concept)" in texts["propagate"]  # a real default is still shown
    # ... also for an option without help text (argparse prints no line for blank help)
    assert "--device DEVICE (default: cpu)" in texts["propagate"]
