"""`microserve serve`'s pools from its flags: engines per role (`--roles`), each pool's bounds
(`--min-engines/--max-engines` per pool, `--scale ROLE:MIN:MAX`), and one-line errors for bad values."""

from __future__ import annotations

import pytest

from microserve.cli import build_parser
from microserve.router.workers import Role
from microserve.serve import pool_configs, pool_plan


def plan(*flags: str) -> dict[Role, tuple[int, int, int]]:
    return pool_plan(build_parser().parse_args(["serve", *flags]))


def test_the_default_is_one_both_pool_of_engines() -> None:
    assert plan() == {Role.BOTH: (2, 2, 2)}
    assert plan("--engines", "3") == {Role.BOTH: (3, 3, 3)}
    assert plan("--min-engines", "0", "--max-engines", "4") == {Role.BOTH: (0, 0, 4)}
    args = build_parser().parse_args(["serve"])
    assert pool_configs(args, pool_plan(args)) is None  # a fixed fleet


def test_roles_start_each_pool_and_scale_bounds_apply_per_pool() -> None:
    assert plan("--roles", "prefill:1,decode:2") == {Role.PREFILL: (1, 1, 1), Role.DECODE: (2, 2, 2)}
    bounded = plan("--roles", "prefill:1,decode:1", "--min-engines", "1", "--max-engines", "3")
    assert bounded == {Role.PREFILL: (1, 1, 3), Role.DECODE: (1, 1, 3)}
    scaled = plan("--roles", "prefill:1,decode:1", "--scale", "decode:0:1", "--scale", "prefill:1:2")
    assert scaled == {Role.PREFILL: (1, 1, 2), Role.DECODE: (1, 0, 1)}
    args = build_parser().parse_args(["serve", "--roles", "prefill:1,decode:1", "--scale", "decode:0:1"])
    configs = pool_configs(args, pool_plan(args))
    assert configs is not None
    assert (configs["decode"].min_replicas, configs["decode"].max_replicas) == (0, 1)
    assert (configs["prefill"].min_replicas, configs["prefill"].max_replicas) == (1, 1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--roles", "prefill"], "ROLE:COUNT"),
        (["--roles", "prefill:x"], "ROLE:COUNT"),
        (["--roles", "middle:1"], "ROLE:COUNT"),
        (["--roles", "prefill:1,prefill:2"], "each role once"),
        (["--roles", "both:1,decode:1"], "do not mix"),
        (["--roles", "prefill:1,decode:1", "--scale", "decode:2:1"], "decode pool needs"),
        (["--roles", "prefill:1,decode:1", "--scale", "both:1:2"], "--roles does not"),
        (["--scale", "decode:0"], "ROLE:MIN:MAX"),
    ],
)
def test_bad_values_are_one_line_errors(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(*flags)


def test_serve_prints_the_error_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from microserve.serve import run_serve

    args = build_parser().parse_args(["serve", "--roles", "prefill:1,decode:x"])
    assert run_serve(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--roles takes ROLE:COUNT pairs" in err
