from p2psched.core.leases import LeaseTable, Verdict


def test_tokens_are_accepted_in_order_and_duplicates_dropped():
    table = LeaseTable(lease_timeout=1.0)
    table.grant("r", "t", "thief", epoch=0, now=0.0)
    assert table.check_tokens("t", "r", 0, 0, now=0.1) is Verdict.ACCEPT
    assert table.check_tokens("t", "r", 0, 1, now=0.2) is Verdict.ACCEPT
    assert table.check_tokens("t", "r", 0, 1, now=0.3) is Verdict.DUPLICATE
    assert table.check_tokens("t", "r", 0, 3, now=0.4) is Verdict.GAP


def test_other_epochs_and_other_thieves_are_stale():
    table = LeaseTable(1.0)
    table.grant("r", "t", "thief", epoch=2, now=0.0)
    assert table.check_tokens("t", "r", 1, 0, now=0.1) is Verdict.STALE
    assert table.check_tokens("u", "r", 2, 0, now=0.1) is Verdict.STALE
    assert table.check_tokens("t", "unknown", 0, 0, now=0.1) is Verdict.STALE


def test_any_message_renews_and_silence_expires():
    table = LeaseTable(1.0)
    table.grant("a", "t", "thief", 0, now=0.0)
    table.grant("b", "t", "thief", 0, now=0.0)
    assert table.renew("t", "a", 0, now=0.9)
    assert not table.renew("t", "a", 1, now=0.9)
    assert [lease.request_id for lease in table.expired(now=1.0)] == ["b"]
    assert table.expired(now=1.5) == []
    assert [lease.request_id for lease in table.expired(now=1.9)] == ["a"]
    assert len(table) == 0


def test_a_retransmitted_final_is_recognised():
    table = LeaseTable(1.0)
    table.grant("r", "t", "thief", 0, now=0.0)
    assert table.check_tokens("t", "r", 0, 0, now=0.1) is Verdict.ACCEPT
    table.release("r", finished=True)
    assert table.check_tokens("t", "r", 0, 0, now=0.2) is Verdict.FINISHED
