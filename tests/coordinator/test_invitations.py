"""The joiner user's rules: it may ask to join and take its answer, nothing else."""

from __future__ import annotations

from broker import keys
from coordinator.runs.invitations import joiner_rules


def test_the_joiner_may_only_push_a_request_and_take_an_answer():
    rules = joiner_rules()
    assert rules[:5] == ["on", "resetkeys", "resetchannels", "clearselectors", "-@all"]
    granted = {r for r in rules if r.startswith("+")}
    assert granted == {"+ping", "+hello", "+client|setinfo"}  # no SELECT on database 0
    assert [r for r in rules if r.startswith("(")] == [
        f"(+rpush ~{keys.join_requests()})",
        f"(+getdel ~{keys.join_reply_pattern()})",
    ]
    assert not any(r.startswith(("~", "%", "&", ">", "nopass", "allkeys", "allcommands")) for r in rules)
    assert "+select" in joiner_rules(db=2) and "+client|setinfo" not in joiner_rules({"ping", "hello"})
