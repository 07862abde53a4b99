"""Tests of torch_lowrank/options.py: validated solver options per recovery method."""

import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
import torch_optimizer

from torch_lowrank import nuclear, projected, solvers
from torch_lowrank import options as opts
from torch_lowrank.options import (
    METHODS,
    LinearOptions,
    NuclearOptions,
    ReluOptions,
    SvdOptions,
    make_options,
    optimizer_class,
)

VALID = {
    "svd": [],
    "linear": ["damping"],
    "relu": ["damping", "max_iter", "tol", "optimizer", "lr"],
    "nuclear": ["damping", "max_iter", "tol", "lam"],
}


def default(function, name):
    return inspect.signature(function).parameters[name].default


def test_methods_and_classes():
    assert METHODS == ("relu", "linear", "svd", "nuclear")
    assert opts.__all__ and all(hasattr(opts, name) for name in opts.__all__)
    for method in METHODS:
        assert make_options(method, None).method == method
        assert [f.name for f in dataclasses.fields(make_options(method, {}))] == VALID[method]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", ["max_itr", "learning_rate", "rank"])
def test_unknown_key_names_it_and_lists_valid_ones(method, key):
    with pytest.raises(TypeError, match=f"unknown option '{key}' for method='{method}'") as info:
        make_options(method, {key: 1}, where="compress")
    message = str(info.value)
    assert message.startswith("compress: ")
    assert message.splitlines()[1] == "valid options: " + (", ".join(VALID[method]) or "(none)")


def test_today_silently_ignored_typo_is_an_error():
    with pytest.raises(TypeError, match="recover_: unknown option 'max_itr' for method='linear'"):
        make_options("linear", {"max_itr": 5})
    with pytest.raises(TypeError, match="'damping'"):  # svd takes nothing
        make_options("svd", {"damping": 0.1})


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of relu, linear, svd, nuclear\n"):
        make_options("lin", {})


BAD = [
    ("linear", "damping", -1e-3),
    ("linear", "damping", math.nan),
    ("linear", "damping", math.inf),
    ("linear", "damping", "0.1"),
    ("linear", "damping", True),
    ("nuclear", "damping", -math.inf),
    ("relu", "max_iter", 5.5),
    ("relu", "max_iter", 5.0),
    ("relu", "max_iter", -1),
    ("relu", "max_iter", True),
    ("relu", "max_iter", np.float64(5.0)),
    ("nuclear", "max_iter", -2),
    ("relu", "tol", -1e-6),
    ("relu", "tol", math.nan),
    ("nuclear", "tol", math.inf),
    ("nuclear", "lam", -0.1),
    ("nuclear", "lam", math.nan),
    ("nuclear", "lam", False),
]


@pytest.mark.parametrize("method, name, value", BAD)
def test_bad_value_names_option_range_and_value(method, name, value):
    with pytest.raises(ValueError) as info:
        make_options(method, {name: value})
    first, second = str(info.value).splitlines()
    assert first.startswith(f"recover_: {method}: {name} must be ")
    assert ">= 0" in first
    assert second == f"but got {value!r}"
    with pytest.raises(ValueError, match=f"^{method}: {name} must be "):  # the class alone
        type(make_options(method, {}))(**{name: value})


def test_message_format():
    with pytest.raises(ValueError) as info:
        ReluOptions(max_iter=5.5)
    assert str(info.value) == "relu: max_iter must be an int >= 0\nbut got 5.5"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"lr": 0.1}, "lr must be None without an optimizer\nbut got 0.1"),
        ({"optimizer": "adam"}, "lr must be a finite float > 0 with an optimizer\nbut got None"),
        ({"optimizer": torch.optim.SGD, "lr": 0.0}, "lr must be a finite float > 0"),
        ({"optimizer": torch.optim.SGD, "lr": -1e-3}, "lr must be a finite float > 0"),
        ({"optimizer": torch.optim.SGD, "lr": math.inf}, "lr must be a finite float > 0"),
        ({"optimizer": "adamx", "lr": 0.1}, "optimizer: unknown optimizer name(.|\n)*lamb"),
        ({"optimizer": dict, "lr": 0.1}, "optimizer must be None, a name, an Optimizer class"),
        ({"optimizer": 3, "lr": 0.1}, "optimizer must be None, a name, an Optimizer class"),
    ],
)
def test_bad_optimizer_or_lr(options, match):
    with pytest.raises(ValueError, match="recover_: relu: " + match):
        make_options("relu", options)


def test_numpy_scalars_become_python_numbers():
    relu = make_options(
        "relu",
        {
            "damping": np.float64(0.5),
            "max_iter": np.int64(7),
            "tol": np.float32(1e-3),
            "optimizer": "sgd",
            "lr": np.float64(0.1),
        },
    )
    assert (relu.damping, relu.max_iter, relu.lr) == (0.5, 7, 0.1)
    assert relu.tol == pytest.approx(1e-3)
    for value in (relu.damping, relu.tol, relu.lr):
        assert type(value) is float
    assert type(relu.max_iter) is int
    assert type(make_options("nuclear", {"lam": np.float64(2.0)}).lam) is float
    assert type(LinearOptions(damping=1).damping) is float  # ints count as floats


def test_defaults_equal_the_solvers_defaults():
    relu, nuc = make_options("relu", None), make_options("nuclear", None)
    assert make_options("linear", None).damping == relu.damping == nuc.damping == 1e-2
    assert default(solvers.corrective, "damping") == 1e-2
    assert default(projected.activation_aware, "max_iter") == relu.max_iter == 30
    assert default(nuclear.nuclear, "max_iter") == nuc.max_iter == 200
    for function in (projected.activation_aware, nuclear.nuclear):
        assert default(function, "tol") == relu.tol == nuc.tol == 1e-6
    assert (relu.optimizer, relu.lr, nuc.lam) == (None, None, None)


def test_solver_kwargs_match_the_solvers():
    relu = ReluOptions(max_iter=3, optimizer="adam", lr=0.01)
    assert relu.solver_kwargs() == {
        "max_iter": 3,
        "tol": 1e-6,
        "optimizer": torch.optim.Adam,
        "lr": 0.01,
    }
    assert NuclearOptions(lam=0.5).solver_kwargs() == {"max_iter": 200, "tol": 1e-6, "lam": 0.5}
    assert LinearOptions().solver_kwargs() == SvdOptions().solver_kwargs() == {}
    for function, options in (
        (projected.activation_aware, relu),
        (nuclear.nuclear, NuclearOptions()),
    ):
        assert set(options.solver_kwargs()) <= set(inspect.signature(function).parameters)


VALID_DICTS = [
    ("svd", {}),
    ("linear", {"damping": 0.0}),
    ("relu", {"damping": 0.1, "max_iter": 0, "tol": 0.0}),
    ("relu", {"optimizer": torch_optimizer.RAdam, "lr": 1e-3, "max_iter": 20}),
    ("relu", {"optimizer": lambda params, lr: torch.optim.SGD(params, lr=lr), "lr": 1.0}),
    ("nuclear", {"lam": 0.0, "max_iter": 10, "tol": 1e-4}),
    ("nuclear", {"lam": None}),
]


@pytest.mark.parametrize("method, options", VALID_DICTS)
def test_valid_dict_round_trips(method, options):
    made = make_options(method, options)
    as_dict = dataclasses.asdict(made)
    assert as_dict == {**dataclasses.asdict(make_options(method, None)), **options}
    assert make_options(method, as_dict) == made
    assert make_options(method, made) is made  # an object passes through
    assert dataclasses.replace(made) == made


def test_options_object_of_another_method_is_a_type_error():
    with pytest.raises(TypeError, match="method='linear' takes LinearOptions\nbut got ReluOptions"):
        make_options("linear", ReluOptions())
    with pytest.raises(TypeError, match="method='relu' takes ReluOptions\nbut got LinearOptions"):
        make_options("relu", LinearOptions())
    with pytest.raises(TypeError, match="options must be a mapping\nbut got list"):
        make_options("relu", [("max_iter", 3)])


@pytest.mark.parametrize("method", METHODS)
def test_frozen(method):
    made = make_options(method, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.damping = 0.5
    hash(made)


def test_replace_validates():
    with pytest.raises(ValueError, match="relu: tol must be"):
        dataclasses.replace(ReluOptions(), tol=-1.0)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("adam", torch.optim.Adam),
        ("AdamW", torch.optim.AdamW),
        ("SGD", torch.optim.SGD),
        ("lbfgs", torch.optim.LBFGS),
        ("lamb", torch_optimizer.Lamb),
        ("RAdam", torch.optim.RAdam),  # torch.optim wins on shared names
        ("yogi", torch_optimizer.Yogi),
    ],
)
def test_optimizer_names_resolve_to_classes(name, cls):
    assert optimizer_class(name) is cls
    assert ReluOptions(optimizer=name, lr=0.1).optimizer is cls


@pytest.mark.parametrize("name", ["adamx", "optimizer", "", 3])
def test_unknown_optimizer_name(name):
    with pytest.raises(ValueError, match="unknown optimizer name(.|\n)*lamb(.|\n)*but got"):
        optimizer_class(name)


def test_solver_kwargs_drive_the_solvers():
    torch.manual_seed(0)
    w, x = torch.randn(8, 6, dtype=torch.float64), torch.randn(64, 6, dtype=torch.float64)
    start = solvers.linear(w, None, x.mean(0), torch.cov(x.T, correction=0), rank=2)
    relu = make_options("relu", {"optimizer": "adam", "lr": 1e-2, "max_iter": 5})
    fit = projected.activation_aware(w, None, x, start, "relu", **relu.solver_kwargs())
    assert fit.rank == 2 and fit.info["iterations"] <= 5
    nuc = make_options("nuclear", {"lam": 1e-3, "max_iter": 5})
    assert nuclear.nuclear(w, None, x, start, **nuc.solver_kwargs()).info["lam"] == 1e-3
