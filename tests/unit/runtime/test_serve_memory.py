"""What a running ``serve`` keeps of its configuration: the compiled policy, not the parsed tasks."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from sidecar.config.schema import EgressRuleSpec, TaskSpec
from sidecar.server import serve
from tests.support.config import base_config, task, write_config, write_keys


def test_serve_keeps_no_parsed_task_once_compiled(tmp_path: Path) -> None:
    """The tasks' models (1,000 tasks of 10 rules: ~17 MB) are dropped once compiled into the policy,
    also by ``serve``'s own frame, which lives as long as the process."""
    write_keys(tmp_path)
    host = "serve-memory.internal"  # names this test's models among what other tests left in the process
    rules = [{"name": f"r{j}", "host": host, "methods": ["GET"], "paths": [f"/v{j}/*"]} for j in range(10)]
    path = write_config(tmp_path, base_config(tmp_path, [task(f"serve-memory-{i}", egress=rules) for i in range(20)]))
    ready = tmp_path / "ready.json"

    async def run() -> tuple[int, int]:
        stop = asyncio.Event()
        serving = asyncio.create_task(serve(path, ready_file=ready, stop=stop))
        while not ready.exists():
            if serving.done():
                serving.result()
            await asyncio.sleep(0.02)
        gc.unfreeze()  # serve froze what it built: back where gc.get_objects() sees it
        gc.collect()
        alive = gc.get_objects()
        specs = sum(isinstance(o, TaskSpec) and o.id.startswith("serve-memory-") for o in alive)
        rule_specs = sum(isinstance(o, EgressRuleSpec) and o.host == host for o in alive)
        del alive
        stop.set()
        await serving
        return specs, rule_specs

    assert asyncio.run(run()) == (0, 0)  # TaskSpec, EgressRuleSpec instances alive while serving
