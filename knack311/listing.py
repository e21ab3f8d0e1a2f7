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
reads, so page 2 starts where page 1 ends; a staff edit in that moment can still shift it, and an activity that
surfaces after a later one of its service request started is then held by the scheduler (HELD, "a later activity
... was already sent") rather than sent out of 311's order.

Paging ends when page 1 is the only page, on the last page, when a page after page 1 brings nothing new (Knack
repeating a page, or saying it has more pages than its record count allows) or after MAX_READS reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_READS = 1000  # reads of a page in one run; each brings new records, so this is a million records


@dataclass
class Read:
    """What one read brought: the records not seen before, in ascending key order, and what it vouches for."""

    page: int
    records: list[dict]
    total_records: int | None
    listed_through: Any = None   # every ready record up to this key has now been seen (None: nothing vouched)
    listed_all: bool = False     # every ready record has now been seen


@dataclass
class Listing:
    """Which page to read next, and what the reads so far have covered. `fetch(page)` reads one page (sorted by
    the order key, ascending) and returns (records, total_pages, total_records); `key(record)` is the order key.
    """

    fetch: Callable[[int], tuple[list[dict], int, int | None]]
    key: Callable[[dict], Any]
    log: Callable[[str], None] = lambda line: None
    sequential: bool = False  # pages 1, 2, 3...: for a run that changes no status (a dry run), nothing shifts
    seen: set[str] = field(default_factory=set)
    complete: bool = False
    reads: int = 0
    _page: int = 1

    def read(self, settled: bool = True) -> Read:
        """Read the next page (page 1, and page 2 at once when page 1 brought nothing new); sets `complete` when
        the listing has covered every ready record."""
        if self.complete:
            raise RuntimeError("the listing is complete")
        page = self._page
        records, total_pages, total_records = self.fetch(page)
        self.reads += 1
        new = []
        for record in records:
            if record["id"] not in self.seen:
                self.seen.add(record["id"])
                new.append(record)
        new.sort(key=self.key)
        read = Read(page, new, total_records)
        if records:
            read.listed_through = max(self.key(r) for r in records)
        if page >= total_pages or not records:
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
            self.log(f"WARNING: Knack ready records page {page} brought no record not seen before (Knack says "
                     f"{total_pages} pages); paging stopped, the others wait for the next run")
            self.complete = read.listed_all = True
        if not self.complete and self.reads >= MAX_READS:
            self.log(f"WARNING: Knack ready records read {self.reads} times in this run; paging stopped, the "
                     "others wait for the next run")
            self.complete = read.listed_all = True
        if page == 1 and not new and settled and not self.complete:
            return self.read()  # page 2 at once: waiting would not change page 1
        return read

    @property
    def next_page(self) -> int:
        return self._page
