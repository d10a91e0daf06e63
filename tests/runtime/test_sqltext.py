"""What Flux reads from a statement's text: the statements that set a transaction's characteristics."""

from __future__ import annotations

import pytest

from flux.runtime.sqltext import refusal, sets_transaction


@pytest.mark.parametrize("sql", [
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "set transaction read only", "SET LOCAL TRANSACTION DEFERRABLE",
    "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ", "SET LOCAL transaction_isolation = 'serializable'",
    "set transaction_read_only to on", "/* orm */ SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
    "-- name: iso\nSET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
])
def test_statements_that_set_the_transactions_characteristics_are_recognised(sql):
    assert sets_transaction(sql)


@pytest.mark.parametrize("sql", [
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",  # for later transactions
    "SET LOCAL statement_timeout = '1s'", "SET search_path = app", "SELECT set_config('transaction_isolation', 'serializable', true)",
    "SHOW transaction_isolation", "SET", "",
])
def test_other_statements_do_not_set_the_transactions_characteristics(sql):
    assert not sets_transaction(sql)


@pytest.mark.parametrize("sql", ["BEGIN ISOLATION LEVEL SERIALIZABLE", "START TRANSACTION ISOLATION LEVEL REPEATABLE READ"])
def test_a_refused_begin_says_how_to_choose_the_isolation_level(sql):
    assert "run SET TRANSACTION ISOLATION LEVEL" in refusal(sql)
