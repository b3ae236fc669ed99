"""`omnistream generate`: every shared engine flag reaches the engine, and the answer is printed."""

from omnistream.engine.entrypoints.cli import main


def test_generate_prints_the_answer(capsys):
    code = main(["generate", "--prompt", "Hello", "--max-tokens", "3", "--num-kv-blocks", "16", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0 and "prompt: 'Hello'" in out and "[3 tokens, length]" in out
