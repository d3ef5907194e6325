"""The websocket server: one batched 80 ms step loop for every connected conversation.

protocol.py (wire format, query parameters), batch.py (slots stacked on the batch dimension),
loop.py (the step loop on the model worker), app.py (the ASGI app, Starlette: /api/chat, /healthz,
/metrics, /; served standalone by uvicorn, or by Ray Serve through engine/cluster.py), client.py
(realtime test clients).
"""
