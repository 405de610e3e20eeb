"""The report's two opening notes: the teacher note says what the teacher is, the setup note which data each
model saw; each fact once."""

from gkd.recipe import load_recipe
from gkd.report.report import _setup_note, _teacher_note
from tests.helpers.paths import TINY_RECIPE


def test_trained_teacher_on_its_own_source():
    recipe = load_recipe(TINY_RECIPE)  # teacher_source: generated world scenes
    teacher, setup = _teacher_note(recipe), _setup_note(recipe)
    assert "was trained in this run" in teacher and "stands in for a vision foundation model" in teacher
    assert "world" not in teacher  # its data is the setup note's
    assert "the source, generated day scenes, only" in setup
    assert "The teacher was trained on labelled generated world scenes" in setup
    assert "unlabelled generated world scenes (the proxy set)" in setup
    assert "dusk (generated dusk scenes), fog (generated fog scenes) are held out" in setup


def test_trained_teacher_on_the_source():
    setup = _setup_note(load_recipe(TINY_RECIPE, ["data.teacher_source=null"]))
    assert "The teacher was trained on the same labelled source." in setup and "world scenes, a" not in setup


def test_teacher_from_weights():
    recipe = load_recipe(TINY_RECIPE, ["models.teacher.train_encoder=false", "models.teacher.weights=/tmp/t.pth"])
    assert _teacher_note(recipe).endswith("is loaded from /tmp/t.pth and frozen.")
    assert "The teacher's head was trained on labelled generated world scenes." in _setup_note(recipe)
    untrained = load_recipe(TINY_RECIPE, ["models.teacher.train_encoder=false", "teacher_training=null"])
    assert "randomly initialised" in _teacher_note(untrained) and "teacher" not in _setup_note(untrained).lower()
