"""The listing's paging rules, against a small in-memory stand-in for Knack's filtered, sorted view: records leave
the view when they are marked, exactly as Knack applies its filter afresh on every request."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from knack311.listing import MAX_READS, MAX_SHIFTS, Listing


class View:
    """Ready records sorted by key, `per_page` a page; `mark` takes a record out, as setting it SENT does.

    sort_ignored: the records come in a shuffled order, the same on every read (a Knack ignoring sort_field);
    `on_page(page, action)`: `action()` runs as the next read of that page arrives (a staff edit at that moment).
    """

    def __init__(self, keys, per_page: int, *, sort_ignored: bool = False):
        self.ready = {f"r{k}": k for k in keys}
        self.per_page = per_page
        self.sort_ignored = sort_ignored
        self.pages_read: list[int] = []
        self.actions: list[tuple[int, object]] = []

    def on_page(self, page: int, action) -> None:
        self.actions.append((page, action))

    def _position(self, item):
        record_id, key = item
        return hashlib.sha256(record_id.encode()).digest() if self.sort_ignored else key

    def fetch(self, page: int):
        due = [action for wanted, action in self.actions if wanted == page]
        self.actions = [(wanted, action) for wanted, action in self.actions if wanted != page]
        for action in due:
            action()
        self.pages_read.append(page)
        ordered = sorted(self.ready.items(), key=self._position)
        chunk = ordered[(page - 1) * self.per_page: page * self.per_page]
        total_pages = max(1, math.ceil(len(ordered) / self.per_page))
        return [{"id": rid, "key": key} for rid, key in chunk], total_pages, len(ordered)

    def mark(self, records):
        for record in records:
            self.ready.pop(record["id"], None)


def listing_of(source: View, **kw) -> tuple[Listing, list[str]]:
    said: list[str] = []
    return Listing(source.fetch, key=lambda r: r["key"], log=said.append, **kw), said


def test_one_page_is_read_once_and_covers_everything():
    view = View(range(1, 6), per_page=10)
    listing, said = listing_of(view)

    read = listing.read()

    assert [r["key"] for r in read.records] == [1, 2, 3, 4, 5]
    assert read.listed_all and listing.complete
    assert view.pages_read == [1] and said == []


def test_a_backlog_of_several_pages_is_drained_through_page_1_while_it_is_marked():
    view = View(range(1, 26), per_page=10)
    listing, said = listing_of(view)
    delivered = []

    while not listing.complete:
        read = listing.read()
        assert read.listed_all or read.listed_through == max(r["key"] for r in read.records)
        delivered += [r["key"] for r in read.records]
        view.mark(read.records)

    assert delivered == list(range(1, 26))  # each once, in key order: nothing skipped by the shifting pages
    assert view.pages_read == [1, 1, 1]
    assert said == []


def test_records_still_held_on_page_1_are_passed_over_and_page_2_is_read_beyond_them():
    view = View(range(1, 16), per_page=5)
    listing, said = listing_of(view)
    first = listing.read()  # keys 1-5: they keep failing, so they stay ready
    assert [r["key"] for r in first.records] == [1, 2, 3, 4, 5] and first.listed_through == 5

    waiting = listing.read(settled=False)  # page 1 again while some of them are in flight: not beyond it yet
    assert waiting.records == [] and view.pages_read == [1, 1] and listing.next_page == 1

    beyond = listing.read()  # none in flight now, page 1 brings nothing new: page 2 at once

    assert view.pages_read == [1, 1, 1, 2]
    assert [r["key"] for r in beyond.records] == [6, 7, 8, 9, 10] and beyond.listed_through == 10
    assert listing.next_page == 1  # then back to page 1, which vouches for keys


def test_a_knack_that_repeats_a_page_ends_the_paging_with_a_warning():
    records = [{"id": f"r{k}", "key": k} for k in range(3)]
    said: list[str] = []
    pages: list[int] = []

    def fetch(page):
        pages.append(page)
        return records, 100_000, 100_000_000

    listing = Listing(fetch, key=lambda r: r["key"], log=said.append)
    while not listing.complete:
        listing.read()

    assert pages == [1, 1, 2]  # page 1, page 1 again (nothing new), page 2 (nothing new): stop
    assert len(said) == 1 and "page 2" in said[0] and "WARNING" in said[0]


def test_a_record_listed_twice_on_one_page_is_taken_once():
    records = [{"id": "a", "key": 1}, {"id": "a", "key": 1}, {"id": "b", "key": 2}]
    listing = Listing(lambda page: (records, 1, 3), key=lambda r: r["key"])
    assert [r["id"] for r in listing.read().records] == ["a", "b"]


def test_a_dry_run_reads_the_pages_in_turn_since_nothing_is_marked():
    view = View(range(1, 26), per_page=10)
    listing, said = listing_of(view, sequential=True)
    keys = []
    while not listing.complete:
        keys += [r["key"] for r in listing.read().records]
    assert keys == list(range(1, 26)) and view.pages_read == [1, 2, 3] and said == []


def test_reading_stops_after_max_reads():
    counter = iter(range(10**9))

    def fetch(page):  # a Knack that invents a new record on every read
        n = next(counter)
        return [{"id": f"r{n}", "key": n}], 2, None

    said: list[str] = []
    listing = Listing(fetch, key=lambda r: r["key"], log=said.append)
    while not listing.complete:
        listing.read()
    assert listing.reads == MAX_READS and len(said) == 1


def test_a_complete_listing_is_not_read_again():
    listing = Listing(lambda page: ([], 1, 0), key=lambda r: 0)
    assert listing.read().listed_all
    with pytest.raises(RuntimeError):
        listing.read()


# ----- a Knack ignoring the sort ----------------------------------------------------------------------------------

def drain(listing: Listing, view: View, *, failing=frozenset()) -> list[int]:
    """Read to the end as the run does with nothing in flight between reads: every new record is marked (leaves the
    view) unless it is failing. The keys as they came, each read's records in the order given."""
    keys = []
    while not listing.complete:
        read = listing.read()
        keys += [r["key"] for r in read.records]
        view.mark([r for r in read.records if r["key"] not in failing])
    return keys


def test_a_page_out_of_order_makes_the_listing_read_whole_and_sorted_before_it_vouches():
    view = View(range(1, 26), per_page=10, sort_ignored=True)
    listing, said = listing_of(view, view="view_42")

    read = listing.read()

    assert view.pages_read == [1, 2, 3]  # every page in turn, before anything is handed out
    assert [r["key"] for r in read.records] == list(range(1, 26))
    assert read.listed_all and listing.complete and listing.unsorted
    assert len(said) == 1 and said[0].startswith("WARNING") and "view_42" in said[0]


def test_a_single_page_out_of_order_is_sorted_and_said_once():
    view = View(range(1, 8), per_page=10, sort_ignored=True)
    listing, said = listing_of(view, view="view_42")

    read = listing.read()

    assert [r["key"] for r in read.records] == list(range(1, 8)) and read.listed_all
    assert view.pages_read == [1] and len(said) == 1


def test_pages_each_in_order_but_not_after_one_another_are_out_of_order():
    # Knack sorting within a page only: page 2 (read at once, page 1 being all this run's) starts below page 1's end
    records = {1: [{"id": "a", "key": 1}, {"id": "c", "key": 5}], 2: [{"id": "b", "key": 3}, {"id": "d", "key": 7}]}
    pages: list[int] = []

    def fetch(page):
        pages.append(page)
        return records[page], 2, 4

    said: list[str] = []
    listing = Listing(fetch, key=lambda r: r["key"], log=said.append, view="view_42")
    assert listing.read().listed_through == 5  # page 1 looks sorted: it vouches up to 5 (what a sorted Knack means)

    read = listing.read()  # page 1 again (all this run's), then page 2: out of order after page 1

    assert listing.unsorted and len(said) == 1
    assert pages == [1, 1, 2, 1, 2]  # read whole from page 1
    assert [r["key"] for r in read.records] == [3, 7] and read.listed_all


def test_a_page_out_of_order_while_records_are_in_flight_waits_to_read_whole():
    view = View(range(1, 26), per_page=10)
    listing, said = listing_of(view)
    first = listing.read()
    view.sort_ignored = True  # Knack starts ignoring the sort

    waiting = listing.read(settled=False)

    assert waiting.records == [] and not waiting.listed_all and listing.unsorted and len(said) == 1
    reads = len(view.pages_read)
    assert listing.read(settled=False).records == [] and len(view.pages_read) == reads  # nothing read meanwhile
    view.mark(first.records)
    whole = listing.read()
    assert [r["key"] for r in whole.records] == list(range(11, 26)) and whole.listed_all
    assert view.pages_read[reads:] == [1, 2]


def test_a_backlog_in_no_order_is_drained_once_each_with_failures_staying_ready():
    view = View(range(1, 48), per_page=5, sort_ignored=True)
    listing, said = listing_of(view)

    keys = drain(listing, view, failing={3, 17, 40})

    assert keys == list(range(1, 48))
    assert view.pages_read == list(range(1, 11)) and len(said) == 1


# ----- a shift between page 1 and page 2 -------------------------------------------------------------------------

def test_a_record_removed_from_page_1_as_page_2_is_read_makes_the_listing_read_page_1_again():
    view = View(range(1, 31), per_page=10)
    listing, said = listing_of(view)
    first = listing.read()  # keys 1-10, which keep failing: they stay ready
    view.on_page(2, lambda: view.ready.pop("r4"))  # staff take one of them out as page 2 is read: 11 slides back

    read = listing.read()

    assert view.pages_read == [1, 1, 2, 1]  # page 2 set aside, page 1 again
    assert [r["key"] for r in read.records] == [11] and read.listed_through == 11  # not up to 21
    assert len(said) == 1 and "from 30 to 29" in said[0] and "page 1" in said[0]
    assert listing.shifts == 1 and not listing.complete
    view.mark(read.records)
    assert drain(listing, view, failing=range(1, 11)) == list(range(12, 31))  # each once, in order
    assert [r["key"] for r in first.records] == list(range(1, 11))


def test_a_record_put_in_before_page_2_as_it_is_read_makes_the_listing_read_page_1_again():
    view = View([k for k in range(1, 31) if k != 5], per_page=10)
    listing, said = listing_of(view)
    listing.read()  # keys 1-4, 6-11: they keep failing

    def edit():  # one record in, one out beyond page 2: the count stays, page 1's last (11) slides onto page 2
        view.ready["r5"] = 5
        view.ready.pop("r30")

    view.on_page(2, edit)
    read = listing.read()

    assert view.pages_read == [1, 1, 2, 1]
    assert [r["key"] for r in read.records] == [5] and read.listed_through == 10
    assert len(said) == 1 and "begins with a record of page 1" in said[0]


def test_a_shift_while_the_whole_listing_is_read_starts_it_again_from_page_1():
    view = View(range(1, 31), per_page=10, sort_ignored=True)
    page_1 = [r["key"] for r in view.fetch(1)[0]]
    view.pages_read.clear()
    view.on_page(3, lambda: view.ready.pop(f"r{page_1[0]}"))  # a staff edit as page 3 is read
    listing, said = listing_of(view)

    read = listing.read()

    assert view.pages_read == [1, 2, 3, 1, 2, 3]
    assert sorted(r["key"] for r in read.records) == [k for k in range(1, 31) if k != page_1[0]]
    assert read.listed_all and len(said) == 2  # the warning, and the shift


def test_a_listing_that_keeps_moving_stops_paging_and_vouches_for_nothing_more():
    view = View(range(1, 200), per_page=10)
    listing, said = listing_of(view)
    listing.read()  # keys 1-10 keep failing
    removed = iter(range(199, 0, -1))

    def staff_edit():  # a removal beyond page 2 at every read of page 2
        view.ready.pop(f"r{next(removed)}")
        view.on_page(2, staff_edit)

    view.on_page(2, staff_edit)
    read = listing.read()

    assert listing.complete and listing.shifts == MAX_SHIFTS
    assert read.records == [] and not read.listed_all
    assert said[-1].startswith("WARNING") and "paging stopped" in said[-1]


def test_a_dry_run_that_sees_a_shift_reads_from_page_1_again():
    view = View(range(1, 26), per_page=10)
    listing, said = listing_of(view, sequential=True)
    view.on_page(2, lambda: view.ready.pop("r1"))

    keys = []
    while not listing.complete:
        keys += [r["key"] for r in listing.read().records]

    assert keys == list(range(1, 26)) and view.pages_read == [1, 2, 1, 2, 3] and len(said) == 1


def test_a_knack_repeating_its_pages_while_ignoring_the_sort_stops_paging_and_vouches_for_nothing():
    records = [{"id": f"r{k}", "key": k} for k in (3, 1, 2)]
    said: list[str] = []
    listing = Listing(lambda page: (records, 100, 300), key=lambda r: r["key"], log=said.append)

    read = listing.read()

    assert listing.complete and not read.listed_all and read.listed_through is None
    assert [r["key"] for r in read.records] == [1, 2, 3]
    assert len(said) == 2 and "page 2 brought no record not seen before" in said[1]


@settings(max_examples=150, deadline=None)
@given(keys=st.sets(st.integers(1, 10_000), min_size=1, max_size=60), per_page=st.integers(1, 12),
       sort_ignored=st.booleans(), data=st.data())
def test_whatever_the_paging_does_no_key_is_vouched_for_while_a_ready_record_up_to_it_is_unseen(
        keys, per_page, sort_ignored, data):
    """The scheduler's promise (an activity starts only when no earlier one of its SR can still be unread): after
    every read, each record still ready with a key up to what the read vouched for has been seen. Staff remove
    records at random moments; some records keep failing (stay ready); the others leave once read."""
    keys = sorted(keys)
    view = View(keys, per_page=per_page, sort_ignored=sort_ignored)
    page_1 = [r["key"] for r in view.fetch(1)[0]]
    # a page that comes in order by chance cannot show that the sort was ignored (a real page holds 1,000 records)
    assume(not sort_ignored or page_1 != sorted(page_1))
    view.pages_read.clear()
    # the first ones failing fill page 1 with this run's records: then page 2 is read right after page 1
    failing = set(keys[:data.draw(st.integers(0, len(keys)))])
    failing |= set(data.draw(st.lists(st.sampled_from(keys), max_size=len(keys) // 2)))
    pages = st.integers(2, 4) if sort_ignored else st.integers(1, 4)  # (page 1 as checked above is the one read)
    for page, doomed in data.draw(st.lists(st.tuples(pages, st.sampled_from(keys)), max_size=4)):
        view.on_page(page, lambda doomed=doomed: view.ready.pop(f"r{doomed}", None))
    listing, said = listing_of(view)

    while not listing.complete:
        read = listing.read()
        unseen = [key for rid, key in view.ready.items() if rid not in listing.seen]
        if read.listed_all:
            assert unseen == [] or any("paging stopped" in line for line in said)
        elif read.listed_through is not None:
            assert all(key > read.listed_through for key in unseen), (unseen, read.listed_through)
        view.mark([r for r in read.records if r["key"] not in failing])
    assert listing.reads < MAX_READS
