"""The registry: fleet's etcd layout and the operations on it, over an abstract KV.

- `registry`: `Registry`, the one face of the schema: units, bodies, schedule, placements,
  states, machines, the engine's leader key, all read and written here.
- `keys`: the key layout under the prefix; `codec`: the values' JSON.
- `kv`: the `KV` contract the registry needs from etcd (implemented by fleetd/etcd for real,
  by `fake.FakeKV` in memory for unit tests and the simulator).
- `mirror`: `Mirror`, the one way to follow the registry (range-read some topics, follow their
  watch, decode every record through one decoder), for the engine, the agent and the API.
- `bodies`: the process's one cache of parsed unit bodies and their requirements, bounded.
- `gc`: unit bodies no unit refers to any more, collected race-free by the engine leader.
- `migrations`: moving an older layout forward; `instrumented`: a KV that counts requests.
"""
