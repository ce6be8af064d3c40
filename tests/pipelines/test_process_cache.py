from __future__ import annotations

from misp_dpo.pipelines.process_cache import ProcessCache


def test_keeps_size_values_and_drops_the_oldest_before_loading_the_next() -> None:
    cache: ProcessCache[str] = ProcessCache(size=1)
    loads: list[str] = []

    def load(key: str) -> str:
        loads.append(f"{key} (holding {len(cache)})")
        return key.upper()

    assert cache.get("a", lambda: load("a")) == "A"
    assert cache.get("a", lambda: load("a")) == "A"  # reused, not reloaded
    assert cache.get("b", lambda: load("b")) == "B"
    assert loads == ["a (holding 0)", "b (holding 0)"]  # a was dropped before b loaded
    cache.clear()
    assert len(cache) == 0
