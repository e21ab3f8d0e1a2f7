"""The listing's paging rules, against a small in-memory stand-in for Knack's filtered, sorted view: records leave
the view when they are marked, exactly as Knack applies its filter afresh on every request."""

from __future__ import annotations

import math

import pytest

from knack311.listing import MAX_READS, Listing


class View:
    """Ready records sorted by key, `per_page` a page; `mark` takes a record out, as setting it SENT does."""

    def __init__(self, keys, per_page: int):
        self.ready = {f"r{k}": k for k in keys}
        self.per_page = per_page
        self.pages_read: list[int] = []

    def fetch(self, page: int):
        self.pages_read.append(page)
        ordered = sorted(self.ready.items(), key=lambda item: item[1])
        chunk = ordered[(page - 1) * self.per_page: page * self.per_page]
        total_pages = max(1, math.ceil(len(ordered) / self.per_page))
        return [{"id": rid, "key": key} for rid, key in chunk], total_pages, len(ordered)

    def mark(self, records):
        for record in records:
            self.ready.pop(record["id"], None)


def listing_of(view: View, **kw) -> tuple[Listing, list[str]]:
    said: list[str] = []
    return Listing(view.fetch, key=lambda r: r["key"], log=said.append, **kw), said


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
