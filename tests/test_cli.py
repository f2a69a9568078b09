"""The command line: generate streams text, pull prints the cached model, bad input exits with a message."""
from lanner.cli import main


def test_generate_streams_a_reply(capsys, default_model_path):
    assert main(["generate", "The capital of France is", "--raw", "--max-tokens", "6", "--dtype", "float32",
                 "--kv-cache-memory", "0.1", "--prefault-kv-cache"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out
    assert "LlamaForCausalLM" in out.err and "float32" in out.err


def test_generate_applies_the_chat_template(capsys, default_model_path):
    assert main(["generate", "What is the capital of France?", "--max-tokens", "12", "--dtype", "float32",
                 "--kv-cache-memory", "0.1"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_pull_prints_the_cached_model_path(capsys, default_model_path):
    assert main(["pull"]) == 0
    assert capsys.readouterr().out.strip() == default_model_path


def test_bad_sampling_parameter_is_reported_by_name(capsys, default_model_path):
    assert main(["generate", "Hi", "--temperature", "-1", "--kv-cache-memory", "0.1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_unknown_adapter_is_reported(capsys, default_model_path):
    assert main(["generate", "Hi", "--adapter", "nope", "--kv-cache-memory", "0.1"]) == 2
    assert "unknown adapter 'nope'" in capsys.readouterr().err


def test_generate_follows_a_json_schema_file_and_a_choice(capsys, tmp_path, default_model_path):
    import json
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    assert main(["generate", "Name a city in JSON.", "--json-schema", f"@{tmp_path / 'schema.json'}",
                 "--max-tokens", "40", "--kv-cache-memory", "0.1"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"city"}
    assert main(["generate", "The capital of France is", "--raw", "--choice", "Paris", "--choice", "Rome",
                 "--kv-cache-memory", "0.1"]) == 0
    assert capsys.readouterr().out.strip() in ("Paris", "Rome")


def test_a_bad_grammar_or_missing_schema_file_is_reported(capsys, default_model_path):
    assert main(["generate", "Hi", "--regex", "(unclosed", "--kv-cache-memory", "0.1"]) == 2
    assert "cannot be compiled" in capsys.readouterr().err
    assert main(["generate", "Hi", "--json-schema", "@/nonexistent/schema.json", "--kv-cache-memory", "0.1"]) == 2
    assert "cannot read /nonexistent/schema.json" in capsys.readouterr().err


def test_the_command_ends_fast_yet_flushes_its_output_and_runs_exit_handlers(default_model_path):
    """`lanner` (cli.run) skips Python's teardown: what it printed and the exit handlers must not be lost."""
    import subprocess
    import sys
    script = ("import atexit, sys; atexit.register(lambda: print('handler ran', file=sys.stderr)); "
              "sys.argv = ['lanner'] + sys.argv[1:]; from lanner.cli import run; run()")
    ok = subprocess.run([sys.executable, "-c", script, "generate", "The capital of France is", "--raw",
                         "--max-tokens", "6", "--dtype", "float32", "--kv-cache-memory", "0.1"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "Paris" in ok.stdout and "handler ran" in ok.stderr
    bad = subprocess.run([sys.executable, "-c", script, "generate", "Hi", "--temperature", "-1",
                          "--kv-cache-memory", "0.1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "temperature" in bad.stderr and "handler ran" in bad.stderr
