"""send_daily_summary (SPEC §4.9): the golden message, the verdict table, once per (user, day), the leader
catch-up the same evening only, no Telegram configured, and delivery through the outbox to the Bot API."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
import time_machine

from accounts.models import Strategy, StrategyAccount
from notifications.models import OutboxMessage, SummarySent, TelegramProfile
from notifications.sender import OutboxSender
from positions.models import Fill, Trade
from reporting.jobs import send_daily_summary
from reporting.summary import (
    EXCELLENT,
    FLAT,
    GOOD,
    LOSS,
    PROFIT_LOW_WIN_RATE,
    DayFigures,
    SummaryFigures,
    percent_change,
    summary_format,
    summary_verdict,
)
from scheduler import runner
from scheduler.models import JobControl, JobRun, Leadership
from scheduler.registry import catch_up_specs
from scheduler.services import catch_up_run
from tests.notifications.conftest import CHAT_ID, USER_BOT_TOKEN, FakeClock
from tests.orders.factories import (
    AccountFactory,
    OpenOrderFactory,
    PendingOrderFactory,
    PositionFactory,
    StrategyAccountFactory,
    StrategyFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

D = Decimal
KST = ZoneInfo("Asia/Seoul")
DAY = date(2026, 3, 10)


def kst(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=KST)


GOLDEN = """📊 <b>Daily summary</b> · 2026-03-10 (KST)
👤 alice&amp;bob &lt;desk&gt;

<b>Trading</b>
Trades: 4 (average volume 5,712.50 USDT)
Volume: 22,850.00 USDT (+128.5% vs yesterday)
Win rate: 66.7% (2 won, 1 lost)

<b>PnL</b>
Realized: +170.00 USDT (+70.0% vs yesterday)
Unrealized: -15.25 USDT
Total: +154.75 USDT

<b>Book</b>
Active strategies: 2 · active accounts: 1
Open positions: 2 · open orders: 3 (2 queued, 1 live)

<b>Verdict</b>: 👍 good"""


class Ledger:
    """Trades and fills written directly (the fill path itself is tested in tests/orders)."""

    def __init__(self) -> None:
        self.n = 0

    def trade(self, sa: StrategyAccount, symbol: str, side: str) -> Trade:
        self.n += 1
        return Trade.objects.create(
            strategy_account=sa,
            account=sa.account,
            exchange_order_id=f"x{self.n}",
            symbol=symbol,
            market_type=sa.strategy.market_type,
            side=side,
        )

    def fill(
        self,
        sa: StrategyAccount,
        trade: Trade | None,
        delta: str,
        price: str,
        at: datetime,
        *,
        realized: str = "0",
        source: str = Fill.Source.REST,
        symbol: str | None = None,
    ) -> Fill:
        self.n += 1
        return Fill.objects.create(
            trade=trade,
            strategy_account=sa,
            symbol=symbol or (trade.symbol if trade else "BTC/USDT"),
            cum_filled_after=D(self.n),
            delta_qty=D(delta),
            price=D(price),
            realized_pnl=D(realized),
            filled_at=at,
            source=source,
        )


@pytest.fixture
def alice() -> dict:
    """Alice's day (2026-03-10 KST) and the day before, with a position book and orders; and Bob's day."""
    user = UserFactory(username="alice&bob <desk>")
    account = AccountFactory(user=user, exchange="PAPER")
    AccountFactory(user=user, exchange="PAPER", is_active=False)
    sa1 = StrategyAccountFactory(account=account, strategy=StrategyFactory(market_type="FUTURES"))
    sa2 = StrategyAccountFactory(account=account, strategy=StrategyFactory(market_type="FUTURES"))
    StrategyAccountFactory(account=account, strategy=StrategyFactory(market_type="FUTURES", is_active=False))
    ledger = Ledger()
    # Yesterday, up to its last minute in KST: volume 0.2 × 50,000 = 10,000; realized +100.
    old = ledger.trade(sa1, "BTC/USDT", "SELL")
    ledger.fill(sa1, old, "-0.2", "50000", kst(2026, 3, 9, 23, 59), realized="100")
    # Today: 4 trades. T1 in two fills (one just after midnight KST): 6,000 + 6,100.
    t1 = ledger.trade(sa1, "BTC/USDT", "BUY")
    ledger.fill(sa1, t1, "0.1", "60000", kst(2026, 3, 10, 0, 10))
    ledger.fill(sa1, t1, "0.1", "61000", kst(2026, 3, 10, 9, 5))
    t2 = ledger.trade(sa1, "BTC/USDT", "SELL")
    ledger.fill(sa1, t2, "-0.1", "62000", kst(2026, 3, 10, 14, 0), realized="150")  # 6,200, won
    t3 = ledger.trade(sa2, "ETH/USDT", "SELL")
    ledger.fill(sa2, t3, "-1", "3000", kst(2026, 3, 10, 20, 0), realized="-40")  # 3,000, lost
    t4 = ledger.trade(sa2, "ETH/USDT", "SELL")
    ledger.fill(sa2, t4, "-0.5", "3100", kst(2026, 3, 10, 20, 30), realized="60")  # 1,550, won
    # A dust close: no trade, no volume, not a closing fill (realized 0).
    ledger.fill(sa1, None, "-0.00001", "62000", kst(2026, 3, 10, 20, 31), source=Fill.Source.ADJUSTMENT)
    # Tomorrow already (a clock skew would not count it today).
    ledger.fill(sa1, ledger.trade(sa1, "BTC/USDT", "BUY"), "1", "1", kst(2026, 3, 11, 0, 0), realized="999")
    PositionFactory(strategy_account=sa1, symbol="BTC/USDT", quantity=D("0.1"), unrealized_pnl=D("-25.5"))
    PositionFactory(strategy_account=sa2, symbol="ETH/USDT", quantity=D("-0.5"), unrealized_pnl=D("10.25"))
    PositionFactory(strategy_account=sa1, symbol="SOL/USDT", quantity=D("0"), unrealized_pnl=D("0"))
    PendingOrderFactory(strategy_account=sa1, symbol="BTC/USDT")
    PendingOrderFactory(strategy_account=sa2, symbol="ETH/USDT", status="SUBMITTING")
    OpenOrderFactory(strategy_account=sa1, symbol="BTC/USDT")

    bob = UserFactory(username="bob")
    bob_sa = StrategyAccountFactory(account=AccountFactory(user=bob), strategy=StrategyFactory(market_type="SPOT"))
    ledger.fill(bob_sa, ledger.trade(bob_sa, "ETH/USDT", "SELL"), "-1", "3000", kst(2026, 3, 10, 12), realized="-5")
    PendingOrderFactory(strategy_account=bob_sa)
    # A user without active accounts gets nothing.
    AccountFactory(user=UserFactory(username="carol"), is_active=False)
    return {"user": user, "bob": bob}


def run_job(*when: int) -> JobRun | None:
    with time_machine.travel(kst(*when), tick=False):
        send_daily_summary()
    return JobRun.objects.filter(job_id="send_daily_summary").order_by("-id").first()


def texts_of(user) -> list[str]:  # noqa: ANN001
    return list(OutboxMessage.objects.filter(user=user).order_by("part_no").values_list("text", flat=True))


# --- The message ---------------------------------------------------------------------------------


def test_golden_message_at_21_03_kst(alice, telegram):  # noqa: ANN001
    run = run_job(2026, 3, 10, 21, 3)

    assert run.outcome == JobRun.Outcome.OK, run.summary
    assert run.summary == "2026-03-10: 2 sent (2 messages), 0 already sent"
    assert texts_of(alice["user"]) == [GOLDEN]
    row = OutboxMessage.objects.get(user=alice["user"])
    assert (row.chat_id, row.bot, row.dedupe_key) == (CHAT_ID, "global", f"daily-summary:{alice['user'].pk}:2026-03-10")
    (bob_text,) = texts_of(alice["bob"])
    assert "Trades: 1 (average volume 3,000.00 USDT)" in bob_text
    assert "Realized: -5.00 USDT (n/a vs yesterday)" in bob_text
    assert "Verdict</b>: 🔻 loss — review strategies" in bob_text
    assert set(SummarySent.objects.values_list("user_id", "day")) == {
        (alice["user"].pk, DAY),
        (alice["bob"].pk, DAY),
    }


def test_a_long_message_is_split_below_4096_by_the_outbox(telegram):  # noqa: ANN001
    figures = SummaryFigures(
        day=DAY,
        username="x" * 5000,
        today=DayFigures(),
        yesterday=DayFigures(),
        unrealized_pnl=D(0),
        active_strategies=0,
        active_accounts=1,
        open_positions=0,
        queued_orders=0,
        live_orders=0,
    )
    from notifications.services import outbox_enqueue

    rows = outbox_enqueue(text=summary_format(figures), dedupe_key="long")
    assert len(rows) >= 2
    assert all(len(row.text.encode("utf-16-le")) // 2 < 4096 for row in rows)
    assert sum(row.text.count("x") for row in rows) == 5000
    assert rows[-1].text.endswith("<b>Verdict</b>: ➖ flat day")


def test_quiet_day_shows_n_a_and_no_currency_when_quotes_mix():
    figures = SummaryFigures(
        day=DAY,
        username="zed",
        today=DayFigures(),
        yesterday=DayFigures(trades=1, volume=D("10"), realized_pnl=D("-3"), losing=1),
        unrealized_pnl=D("-0.001"),
        active_strategies=1,
        active_accounts=1,
        open_positions=0,
        queued_orders=0,
        live_orders=0,
    )
    text = summary_format(figures)
    assert "Trades: 0 (average volume n/a)" in text
    assert "Volume: 0.00 (-100.0% vs yesterday)" in text
    assert "Win rate: n/a (0 won, 0 lost)" in text
    assert "Realized: 0.00 (+100.0% vs yesterday)" in text
    assert "Unrealized: 0.00\n" in text  # never "-0.00"
    assert text.endswith("<b>Verdict</b>: ➖ flat day")


@pytest.mark.parametrize(
    ("pnl", "win_rate", "verdict"),
    [
        ("100", "70", EXCELLENT),
        ("0.01", "100", EXCELLENT),
        ("100", "69.99", GOOD),
        ("100", "50", GOOD),
        ("100", "49.99", PROFIT_LOW_WIN_RATE),
        ("100", None, PROFIT_LOW_WIN_RATE),
        ("-0.01", "100", LOSS),
        ("-50", None, LOSS),
        ("0", "100", FLAT),
        ("0", None, FLAT),
    ],
)
def test_verdict_table(pnl, win_rate, verdict):  # noqa: ANN001
    assert summary_verdict(pnl=D(pnl), win_rate=D(win_rate) if win_rate else None) == verdict


@pytest.mark.parametrize(
    ("fills", "line"),
    [
        ([("30", "3"), ("10", "7")], "🚀 excellent"),  # +40, 2 of 2 won
        ([("30", "3"), ("-10", "7")], "👍 good"),  # +20, 1 of 2
        ([("30", "3"), ("-10", "7"), ("-10", "7")], "⚠️ profit, low win rate"),  # +10, 1 of 3
        ([("-30", "3"), ("10", "7")], "🔻 loss — review strategies"),
        ([("10", "3"), ("-10", "7")], "➖ flat day"),
    ],
)
def test_each_verdict_row_reaches_the_message(telegram, fills, line):  # noqa: ANN001
    sa = StrategyAccountFactory(strategy=StrategyFactory(market_type="FUTURES"))
    ledger = Ledger()
    for realized, price in fills:
        ledger.fill(sa, ledger.trade(sa, "BTC/USDT", "SELL"), "-1", price, kst(2026, 3, 10, 12), realized=realized)
    run_job(2026, 3, 10, 21, 3)
    (text,) = texts_of(sa.account.user)
    assert text.endswith(f"<b>Verdict</b>: {line}")


def test_percent_change():
    assert percent_change(D("150"), D("100")) == D("50")
    assert percent_change(D("50"), D("-100")) == D("150")
    assert percent_change(D("5"), D("0")) is None


# --- Once per (user, day) -------------------------------------------------------------------------


def test_the_job_run_twice_the_same_day_sends_once(alice, telegram):  # noqa: ANN001
    run_job(2026, 3, 10, 21, 3)
    second = run_job(2026, 3, 10, 21, 40)
    assert second.outcome == JobRun.Outcome.NOOP
    assert second.summary == "2026-03-10: 0 sent (0 messages), 2 already sent"
    assert OutboxMessage.objects.count() == 2
    assert SummarySent.objects.count() == 2
    # The next day is a new summary.
    run_job(2026, 3, 11, 21, 3)
    assert OutboxMessage.objects.count() == 4
    assert SummarySent.objects.filter(day=date(2026, 3, 11)).count() == 2


def test_user_own_bot_and_chat_are_used(alice, telegram):  # noqa: ANN001
    TelegramProfile.objects.create(user=alice["user"], bot_token=USER_BOT_TOKEN, chat_id="777")
    run_job(2026, 3, 10, 21, 3)
    row = OutboxMessage.objects.get(user=alice["user"])
    assert (row.bot, row.chat_id) == (f"user:{alice['user'].pk}", "777")
    assert OutboxMessage.objects.get(user=alice["bob"]).chat_id == CHAT_ID


def test_without_telegram_nothing_is_queued_and_the_summary_says_so(alice, no_telegram):  # noqa: ANN001
    run = run_job(2026, 3, 10, 21, 3)
    assert run.outcome == JobRun.Outcome.NOOP
    assert run.summary == "2026-03-10: no Telegram configured: 0 sent (2 users with active accounts)"
    assert not OutboxMessage.objects.exists()
    assert not SummarySent.objects.exists()


def test_a_user_with_own_telegram_is_served_when_nothing_global_is_set(alice, no_telegram):  # noqa: ANN001
    TelegramProfile.objects.create(user=alice["bob"], bot_token=USER_BOT_TOKEN, chat_id="777")
    run = run_job(2026, 3, 10, 21, 3)
    assert run.summary == "2026-03-10: 1 sent (1 messages), 0 already sent, 1 without Telegram"
    assert list(OutboxMessage.objects.values_list("user_id", flat=True)) == [alice["bob"].pk]


# --- Leader catch-up ------------------------------------------------------------------------------


@pytest.fixture
def term7():  # noqa: ANN201
    Leadership.objects.update_or_create(id=1, defaults={"term": 7})
    return SimpleNamespace(term=7)


def test_catch_up_is_a_leader_hook_before_the_announcement():
    hooks = runner.LEADER_HOOKS
    assert "send_daily_summary" in [spec.id for spec in catch_up_specs()]
    assert hooks.index("scheduler.services:leader_catch_up") < hooks.index("scheduler.services:leader_announce")


def test_a_leader_back_at_22_00_sends_the_missed_summary(alice, telegram, term7):  # noqa: ANN001
    with time_machine.travel(kst(2026, 3, 10, 22, 0), tick=False):
        assert catch_up_run(host=term7, job_id="send_daily_summary") is True
    run = JobRun.objects.get(job_id="send_daily_summary")
    assert (run.kind, run.term, run.outcome) == (JobRun.Kind.CATCHUP, 7, JobRun.Outcome.OK)
    assert texts_of(alice["user"]) == [GOLDEN]
    # Another takeover later that evening sends nothing again.
    with time_machine.travel(kst(2026, 3, 10, 23, 59), tick=False):
        assert catch_up_run(host=term7, job_id="send_daily_summary") is True
    assert OutboxMessage.objects.count() == 2


def test_a_leader_back_after_midnight_or_before_21_03_sends_nothing(alice, telegram, term7):  # noqa: ANN001
    for moment in (kst(2026, 3, 11, 0, 30), kst(2026, 3, 10, 21, 2, 59), kst(2026, 3, 10, 9, 0)):
        with time_machine.travel(moment, tick=False):
            assert catch_up_run(host=term7, job_id="send_daily_summary") is False
    assert not JobRun.objects.exists()
    assert not OutboxMessage.objects.exists()


def test_catch_up_skips_a_paused_job_and_a_stale_term(alice, telegram, term7):  # noqa: ANN001
    JobControl.objects.create(job_id="send_daily_summary", paused=True, pause_reason="quiet week")
    with time_machine.travel(kst(2026, 3, 10, 22, 0), tick=False):
        assert catch_up_run(host=term7, job_id="send_daily_summary") is False
    JobControl.objects.all().delete()
    Leadership.objects.filter(id=1).update(term=8)
    with time_machine.travel(kst(2026, 3, 10, 22, 0), tick=False):
        catch_up_run(host=term7, job_id="send_daily_summary")  # the claim is refused: term 7 is over
    assert not OutboxMessage.objects.exists()
    assert not JobRun.objects.filter(job_id="send_daily_summary").exists()


# --- Delivery -------------------------------------------------------------------------------------


def test_the_summary_reaches_the_bot_api_through_the_outbox_sender(alice, telegram, host):  # noqa: ANN001
    run_job(2026, 3, 10, 21, 3)
    clock = FakeClock(kst(2026, 3, 10, 21, 3, 5))
    sender = OutboxSender(host, now=clock.now, sleep=clock.sleep)
    for _ in range(10):
        if not OutboxMessage.objects.exclude(status=OutboxMessage.Status.SENT).exists():
            break
        clock.sleep(sender.run_once())
    assert GOLDEN in telegram.texts(CHAT_ID)
    sent = telegram.requests[telegram.texts(CHAT_ID).index(GOLDEN)]
    assert sent["parse_mode"] == "HTML"
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {OutboxMessage.Status.SENT}


def test_strategy_count_ignores_inactive_links():
    user = UserFactory()
    account = AccountFactory(user=user)
    strategy = StrategyFactory()
    StrategyAccountFactory(account=account, strategy=strategy)
    StrategyAccountFactory(account=AccountFactory(user=user), strategy=strategy)  # same strategy twice
    StrategyAccountFactory(account=account, strategy=StrategyFactory(), is_active=False)
    from reporting.summary import summary_figures

    figures = summary_figures(user=user, day=DAY, tz="Asia/Seoul")
    assert (figures.active_strategies, figures.active_accounts) == (1, 2)
    assert Strategy.objects.count() == 2
