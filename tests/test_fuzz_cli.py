"""Fuzzing the command line (issue 16): over argument values, `validate` (everything checked before the model is
loaded) either accepts the call or refuses it with a one-line UsageError; never a traceback, and a refused call
creates nothing."""

from hypothesis import HealthCheck, given, settings, strategies as st

from pystream.cli import RunConfig, UsageError, build_parser, validate

NUMBERS = ["--sinks", "--steps", "--warmup", "--batch", "--ppl-tokens", "--ppl-cache", "--recompute-samples",
           "--threads", "--seed", "--profile-steps", "--experiment-cache"]
SIZES = ["--lengths", "--cache-sizes", "--experiment-tokens", "--cache-tokens", "--stability-tokens"]
number_text = st.one_of(st.integers(-(1 << 70), 1 << 70).map(str), st.text(max_size=8),
                        st.sampled_from(["0", "1", "-1", "1e9", "4k", "99999999999999999999999", "9" * 5000]))
size_text = st.one_of(st.lists(st.one_of(st.integers(-5, 1 << 70).map(str),
                                         st.sampled_from(["4k", "1M", "0", "", " ", "4x", "9" * 5000])),
                               min_size=1, max_size=3).map(",".join),
                      st.text(max_size=8))
method_text = st.lists(st.sampled_from(["sink", "window", "dense", "recompute", "dense-pi:2", "dense-ntk:0.5",
                                        "dense-yarn:1e9", "dense-pi:99999999999", "turbo", ""]),
                       min_size=1, max_size=3).map(",".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_every_call_is_accepted_or_refused_in_one_line(tmp_path, data):
    out = tmp_path / "run"
    argv = ["--out", str(out)]
    for option in data.draw(st.lists(st.sampled_from(NUMBERS + SIZES + ["--methods", "--experiment"]),
                                     max_size=4, unique=True)):
        if option == "--experiment":
            argv += ["--experiment", "paper"]
        else:
            strategy = number_text if option in NUMBERS else method_text if option == "--methods" else size_text
            argv += [option, data.draw(strategy)]
    try:
        config = validate(build_parser().parse_args(argv), argv)
    except UsageError as err:
        assert "\n" not in str(err) and str(err)
    else:
        assert isinstance(config, RunConfig)
    assert not out.exists()  # validation creates nothing, accepted or not
