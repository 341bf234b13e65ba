"""Live serving in a browser (``serve.py``): a microphone in, the avatar's video with that audio out.

The browser sends 16 kHz PCM over a WebSocket as it is captured; one loaded
:class:`~liveavatar.pipeline.LiveAvatarPipeline` (or, ``engine=tpp``, a TPP group of processes the server starts)
turns it, block by block with causal audio features, into video that goes back as fragmented MP4 for Media Source
Extensions. One session is served at a time; the others wait in a queue. The parts, one idea each:

* :mod:`.fmp4`: frames + audio of a block -> the bytes of MP4 fragments (PyAV, H.264 baseline + AAC);
* :mod:`.live_audio`: the client's audio as the engine takes it, paced in real time: silence while the client
  sends nothing, whole blocks dropped (and counted) when the engine falls behind;
* :mod:`.session`: one client's stream, run on the model's thread, as events (fragments and figures);
* :mod:`.outgoing`: what waits for one client's socket, bounded: a slow client loses whole old fragments;
* :mod:`.tpp_group` / :mod:`.tpp_rank`: ``engine=tpp``: the server's side of the TPP ranks (start them, feed each
  session's audio to rank 0, take the decoded blocks from the output rank) and a rank's side;
* :mod:`.scheduler`: one session at a time, the others queued with their positions, refused past a limit;
* :mod:`.protocol`: the WebSocket messages, checked, with one-line errors;
* :mod:`.app`: the FastAPI app (the page, the socket, ``/api/status``) and the uvicorn server;
* ``page/``: the browser side (HTML + JavaScript).
"""
