"""pytest-asyncio (1.4+) makes the loop of each test marked ``asyncio`` with the factory this hook names."""

import pollserve


def pytest_asyncio_loop_factories(config, item):
    return {"pollserve": pollserve.new_event_loop}
