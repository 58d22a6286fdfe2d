"""The generator process: vLLM rollouts pulled from Redis, graded, published; weights swapped in flight."""
