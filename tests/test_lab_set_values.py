"""`pimaster lab set` refuses unknown keys and bad values before it looks for a lab, so nothing is
written (the lab tier shows good values reaching a node's agent: tests/e2e/test_pi_like_lab.py).
Needs no lab and no root: every case here is refused before either matters."""

from __future__ import annotations

import pytest

from pimaster import lab


@pytest.mark.parametrize("pair, says", [
    ("fan=on", "known: temp= ("), ("fan=on", "; throttled= ("), ("temp", "not a known setting"), ("temp=", "needs a value"),
    ("temp=126", "-40 to 125"), ("temp=-41", "-40 to 125"), ("temp=nan", "temp=nan"), ("temp=inf", "temp=inf"),
    ("temp=hot", "temp=hot"), ("throttled=0xzz", "32-bit"), ("throttled=-1", "32-bit"),
    ("throttled=0x100000000", "32-bit"), ("throttled=0b101", "32-bit"),
])
def test_bad_keys_and_values_are_refused_with_exit_2(pair, says, capsys):
    # A good value first: one bad word refuses the whole command.
    assert lab.main(["set", "node03", "temp=50", pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pimaster lab: error: ") and says in err, err
