"""The ready records, read page by page while the earlier ones are being delivered (flat memory).

Knack applies the view's filter afresh on every request, so each record this run sets SENT or DO_NOT_SEND drops
out of the list and the later records move up: page 2 read after marking page 1 no longer holds what page 2 held
before. Reading pages 2, 3, ... while marking would skip records. So the pages are asked for sorted by
atd_activity_id, ascending, and the run reads **page 1 again** each time it needs more work: the records it has
finished are gone from it, and those it still holds (waiting, in flight, failed, held) are passed over, so page 1
brings the next records in 311's order. The memory held is one page and the records not yet finished, whatever
the backlog.

What a read vouches for (the scheduler starts an activity of a service request only when no earlier activity of
it can still be unread): every key up to the last record of the page, and everything when it is the last page.
Page 1 may bring nothing new: every record on it is still this run's. While some of them are in flight the run
waits for them and reads page 1 again; once none is (page 1 is a thousand records that keep failing or are held),
page 2 is read at once, and page 1 again after that. Nothing of this run changes a status between those two
reads, so page 2 starts where page 1 ends, unless Knack's paging breaks 311's order. Two ways it can are checked:
- a page whose keys do not ascend, or a page N that begins below the last key of page N-1 (Knack ignored the
  sort): no page vouches for anything then. One WARNING names the view, and the whole listing is read, every page
  in turn from page 1 with none of this run's records in flight, and sorted, before anything beyond what earlier
  reads vouched for may start (memory then holds the whole backlog);
- a shift between page N-1 and page N, read one right after the other: Knack's total_records changed (none of
  this run's records can have left the view in between: none is in flight, and a dry run changes nothing), or
  page N begins with a record of page N-1. A staff edit took a record out of an earlier page (page N's first
  record slid back, unseen) or put one in. Page N is set aside and the reading starts again from page 1, so no
  activity starts while an earlier one of its service request may be unseen.
An activity that still surfaces after a later one of its service request started (a record set back to
READY_TO_SEND with an old key) is held by the scheduler (HELD, "a later activity ... was already sent") rather
than sent out of 311's order.

Paging ends when page 1 is the only page, on the last page, when a page after page 1 brings nothing new (Knack
repeating a page, or saying it has more pages than its record count allows) or after MAX_READS reads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_READS = 1000  # reads of a page in one run; each brings new records, so this is a million records
MAX_SHIFTS = 10   # shifts seen in one run before paging stops: each needs a staff edit within a page read's time


@dataclass
class Read:
    """What one read brought: the records not seen before, in ascending key order, and what it vouches for."""

    page: int
    records: list[dict]
    total_records: int | None
    listed_through: Any = None   # every ready record up to this key has now been seen (None: nothing vouched)
    listed_all: bool = False     # every ready record has now been seen


@dataclass(frozen=True)
class _Page:
    """One page as Knack answered it."""

    page: int
    records: list[dict]
    total_pages: int
    total_records: int | None

    @property
    def last(self) -> bool:
        return self.page >= self.total_pages or not self.records


@dataclass
class Listing:
    """Which page to read next, and what the reads so far have covered. `fetch(page)` reads one page (sorted by
    the order key, ascending) and returns (records, total_pages, total_records); `key(record)` is the order key;
    `view` names the Knack view in what the listing says.
    """

    fetch: Callable[[int], tuple[list[dict], int, int | None]]
    key: Callable[[dict], Any]
    log: Callable[[str], None] = lambda line: None
    sequential: bool = False  # pages 1, 2, 3...: a run that changes no status (a dry run) shifts no page itself
    view: str = ""
    seen: set[str] = field(default_factory=set)
    complete: bool = False
    unsorted: bool = False  # a page came back out of order: only the whole listing, read at once, vouches
    reads: int = 0
    shifts: int = 0
    _page: int = 1
    _last: _Page | None = None      # the page read last
    _previous: _Page | None = None  # the page read before it: the page read last must continue it

    def read(self, settled: bool = True) -> Read:
        """Read the next page (page 1, and page 2 at once when page 1 brought nothing new); sets `complete` when
        the listing has covered every ready record. `settled`: none of this run's records is in flight, so none
        can leave the view while pages are read one after the other."""
        if self.complete:
            raise RuntimeError("the listing is complete")
        if self.unsorted:
            # a record of this run leaving the view while the pages are read would shift one past the reading
            return self._read_whole() if settled else Read(1, [], None)
        while True:
            got = self._fetch(self._page)
            if self._shifted(got, self.seen):
                self._page = 1
                if self._stopped():
                    return Read(got.page, [], got.total_records)
                continue
            if not self._in_order(got):
                self._turn_unsorted(got.page)
                if not settled:
                    return Read(got.page, [], got.total_records)  # set aside: read whole once nothing is in flight
                return self._read_whole(got if got.page == 1 else None)
            read = self._vouched(got, settled)
            if got.page == 1 and not read.records and settled and not self.complete:
                continue  # page 2 at once: waiting would not change page 1
            return read

    @property
    def next_page(self) -> int:
        return self._page

    def _vouched(self, got: _Page, settled: bool) -> Read:
        """A page in order: its new records, every key up to its last vouched for, and where to read next."""
        page, records = got.page, got.records
        new = self._take_new(records)
        read = Read(page, new, got.total_records)
        if records:
            read.listed_through = max(self.key(r) for r in records)
        if got.last:
            self.complete = read.listed_all = True
        elif self.sequential:
            self._page = page + 1
        elif page == 1:
            # nothing new: page 1 holds only this run's records. Page 2 only once none of them is in flight: a
            # record marked between the two reads would shift page 2 by one and hide a record from both reads.
            self._page = 1 if new or not settled else 2
        elif new:
            self._page = 1  # back to page 1: the records finished meanwhile left it, the next ones moved up
        else:
            self._repeated(got)
            read.listed_all = True
        if self._stopped():
            read.listed_all = True
        return read

    def _read_whole(self, first: _Page | None = None) -> Read:
        """Every page from page 1 in turn, sorted: what vouches for a listing in no order. `first`: page 1, just
        read. A shift between two pages (a staff edit) starts it again from page 1."""
        pages = [first] if first is not None else []
        collected = {r["id"] for r in first.records} if first is not None else set()
        while not pages or not pages[-1].last:
            if self._stopped():
                # what was read vouches for nothing: the records with an SR wait for the next run
                return Read(1, self._take_new([r for p in pages for r in p.records]), None)
            got = self._fetch(pages[-1].page + 1 if pages else 1)
            if self._shifted(got, collected):
                pages, collected = [], set()
                continue
            if pages and not {r["id"] for r in got.records} - collected:
                self._repeated(got)
                return Read(got.page, self._take_new([r for p in pages for r in p.records]), got.total_records)
            pages.append(got)
            collected.update(r["id"] for r in got.records)
        records = [r for p in pages for r in p.records]
        self.complete = True
        return Read(pages[-1].page, self._take_new(records), pages[-1].total_records,
                    listed_through=max((self.key(r) for r in records), default=None), listed_all=True)

    def _fetch(self, page: int) -> _Page:
        records, total_pages, total_records = self.fetch(page)
        self.reads += 1
        got = _Page(page, records, total_pages, total_records)
        self._previous, self._last = self._last, got
        return got

    def _shifted(self, got: _Page, known: set[str]) -> bool:
        """Page N, read right after page N-1, does not continue it: the listing moved in between. A page bringing
        no record beyond `known` cannot start anything out of order: the rule on repeated pages decides."""
        before = self._previous
        if before is None or got.page != before.page + 1:
            return False
        if None not in (before.total_records, got.total_records) and got.total_records != before.total_records:
            why = f"Knack's count of ready records went from {before.total_records} to {got.total_records}"
        elif (got.records and any(r["id"] not in known for r in got.records)
              and got.records[0]["id"] in {r["id"] for r in before.records}):
            why = f"page {got.page} begins with a record of page {before.page}"
        else:
            return False
        self.shifts += 1
        self.log(f"Knack ready records moved between the reads of page {before.page} and page {got.page} ({why}: "
                 "a change in Knack meanwhile); reading again from page 1")
        return True

    def _in_order(self, got: _Page) -> bool:
        """The page's keys ascend, and (when it brings a record not seen before) follow those of the page read
        right before it."""
        keys = [self.key(r) for r in got.records]
        if any(b < a for a, b in itertools.pairwise(keys)):
            return False
        before = self._previous
        if (keys and before is not None and before.records and got.page == before.page + 1
                and any(r["id"] not in self.seen for r in got.records)):
            return not keys[0] < self.key(before.records[-1])
        return True

    def _turn_unsorted(self, page: int) -> None:
        self.unsorted = True
        self.log(f"WARNING: Knack view {self.view} answered ready records not in ascending order of the sort field "
                 f"(page {page}; the sort was ignored): reading every page before anything more starts, to keep "
                 "311's order")

    def _take_new(self, records: list[dict]) -> list[dict]:
        """The records not seen before (each once), in ascending key order; now seen."""
        new = []
        for record in records:
            if record["id"] not in self.seen:
                self.seen.add(record["id"])
                new.append(record)
        new.sort(key=self.key)
        return new

    def _repeated(self, got: _Page) -> None:
        """A page after page 1 brought nothing new: Knack repeats a page (or miscounts its pages); paging ends."""
        self.log(f"WARNING: Knack ready records page {got.page} brought no record not seen before (Knack says "
                 f"{got.total_pages} pages); paging stopped, the others wait for the next run")
        self.complete = True

    def _stopped(self) -> bool:
        """Paging ends (the listing is complete; the rest waits for the next run) after MAX_READS reads or
        MAX_SHIFTS shifts."""
        if self.complete:
            return False
        if self.reads >= MAX_READS:
            why = f"read {self.reads} times in this run"
        elif self.shifts >= MAX_SHIFTS:
            why = f"moved between page reads {self.shifts} times in this run (changes in Knack)"
        else:
            return False
        self.log(f"WARNING: Knack ready records {why}; paging stopped, the others wait for the next run")
        self.complete = True
        return True
