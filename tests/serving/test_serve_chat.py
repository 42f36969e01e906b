"""Chat prompts: a model directory's Jinja template (transformers' files) rendered as transformers renders it,
its special tokens encoded as their ids; the plain template otherwise; refusals as one line."""

import json

import pytest

from openxlstm.errors import UserError
from openxlstm.serving.chat import ChatError, ChatTemplate, plain_prompt

pytest.importorskip("jinja2")

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_the_directory_template_as_transformers_renders_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from openxlstm.data import train_bpe

    tok = train_bpe(["Be brief. Hi there, assistant and user and system."] * 20, 300)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>"}))
    chat = ChatTemplate.from_directory(tmp_path)
    text = chat.render(MESSAGES)
    tok.save(tmp_path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>")
    assert text == theirs.apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=False,
                                              add_generation_prompt=True)
    ids = chat.encoder(tok)(text)
    assert ids.count(tok.eod_id) == 3  # "<|endoftext|>" in the template is the special token
    assert tok.eod_id not in [int(t) for t in tok.encode(text)]  # in text it stays text (openxlstm's rule)
    assert ids == tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids


def test_without_a_template_the_plain_one(tmp_path):
    chat = ChatTemplate.from_directory(tmp_path)
    assert chat.source == "plain" and chat.render(MESSAGES) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert plain_prompt(MESSAGES) == chat.render(MESSAGES)


def test_template_mistakes(tmp_path):
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(UserError, match="not a valid Jinja template"):
        ChatTemplate.from_file(tmp_path / "bad.jinja")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(UserError, match="cannot read"):
        ChatTemplate.from_directory(tmp_path)
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be "
                          "from the user') }}{% endif %}{{ messages[0]['content'] }}")
    with pytest.raises(ChatError, match="must be from the user"):
        strict.render(MESSAGES)
    assert strict.render(MESSAGES[1:]) == "Hi"
