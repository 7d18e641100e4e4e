from minicake.cache.block_keys import block_key, block_keys


def test_equal_key_means_equal_prefix():
    a = block_keys(list(range(40)), block_size=16)
    b = block_keys(list(range(32)) + [99] * 8, block_size=16)
    assert len(a) == 2 and a == b  # the third, partial block gets no key


def test_a_changed_early_token_changes_every_later_key():
    a = block_keys(list(range(48)), block_size=16)
    b = block_keys([7] + list(range(1, 48)), block_size=16)
    assert all(x != y for x, y in zip(a, b))


def test_keys_chain_from_a_parent():
    tokens = list(range(64))
    keys = block_keys(tokens, block_size=16)
    assert block_keys(tokens[32:], 16, parent=keys[1]) == keys[2:]
    assert block_key(keys[0], tokens[16:32]) == keys[1]


def test_trace_hash_ids_chain_with_block_size_one():
    assert block_keys([5, 6, 7], block_size=1) == block_keys([5, 6], block_size=1) + [block_key(block_keys([5, 6], 1)[-1], [7])]
