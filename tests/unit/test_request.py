import pytest

from p2psched.core.errors import IllegalTransition
from p2psched.core.protocol import Sampling
from p2psched.core.request import TRANSITIONS, Request, State


def make():
    return Request("r", [1], Sampling(max_tokens=4, seed=0), 0.0, 10.0)


def test_legal_path_through_a_lease_and_back():
    r = make()
    for state in (State.LEASED, State.PENDING, State.RUNNING, State.FINISHED):
        r.transition(state)
    assert r.state is State.FINISHED and r.is_done


@pytest.mark.parametrize("start, target", [(State.PENDING, State.FINISHED), (State.RUNNING, State.LEASED),
                                           (State.FINISHED, State.PENDING), (State.CANCELLED, State.RUNNING)])
def test_illegal_transitions_raise(start, target):
    r = make()
    r.state = start
    assert target not in TRANSITIONS[start]
    with pytest.raises(IllegalTransition):
        r.transition(target)
