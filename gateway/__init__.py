"""`rerank-gateway`: the fleet behind the HTTP rerank APIs that Cohere, Jina and TEI clients speak.

It imports only `producer` (never torch or `worker`): requests are validated, enqueued on the
model's queues through the producer's client, and answered from the result backend. It keeps
no state of its own, so it scales by replicas.
"""
