"""The reward server process: ORZ's rule-based 0/1 correctness reward behind `POST /v1/grade`.

`extract.py` finds the final boxed answer, `grading.py` checks it with math-verify in killable worker
processes, `app.py` is the FastAPI app and `serve()` (run by `orz reward-server`).
"""
