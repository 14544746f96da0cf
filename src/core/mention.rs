//! Does a group message mention this agent?
//!
//! A mention is `@<agentId>` or `@all`, case-insensitive, as a whole word: the character
//! before `@` is not part of a word (so `bob@alice.dev` mentions nobody) and the character
//! after the name is not a word character or `-`. The agent id is matched literally: the
//! old package built a regular expression from it, so an id like `a.b` or `c++` broke.

/// True when `content` mentions `agent_id` or `@all`.
pub fn mentions(content: &str, agent_id: &str) -> bool {
    let content = content.to_lowercase();
    let names = [agent_id.to_lowercase(), "all".to_owned()];
    content.match_indices('@').any(|(at, _)| {
        let before_ok = content[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word(c));
        let rest = &content[at + 1..];
        before_ok
            && names.iter().any(|name| {
                !name.is_empty()
                    && rest.starts_with(name.as_str())
                    && rest[name.len()..]
                        .chars()
                        .next()
                        .is_none_or(|c| !is_word(c) && c != '-')
            })
    })
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

#[cfg(test)]
mod tests {
    use super::mentions;

    #[test]
    fn mention_table() {
        let cases = [
            ("hey @alice", "alice", true),
            ("@alice: do this", "alice", true),
            ("@ALICE please", "alice", true),
            ("hello @Alice.", "alice", true),
            ("(@alice)", "alice", true),
            ("@all hands", "alice", true),
            ("@ALL", "alice", true),
            ("@alicebob", "alice", false),
            ("@alice-2 only", "alice", false),
            ("@alice_x", "alice", false),
            ("mail bob@alice.dev", "alice", false),
            ("no mention", "alice", false),
            ("@allison", "alice", false),
            ("@", "alice", false),
            // Regex metacharacters in ids are literal.
            ("ping @a.b now", "a.b", true),
            ("ping @axb now", "a.b", false),
            ("@c++ build", "c++", true),
            ("@[x](y) hi", "[x](y)", true),
            ("@agent/1 go", "agent/1", true),
            // Non-ASCII ids and content.
            ("salut @zoë!", "Zoë", true),
            ("@zoëx", "zoë", false),
            ("@émile", "all", false),
            ("", "alice", false),
        ];
        for (content, id, want) in cases {
            assert_eq!(mentions(content, id), want, "{content:?} / {id:?}");
        }
    }

    #[test]
    fn empty_id_mentions_only_all() {
        assert!(!mentions("@ hi", ""));
        assert!(mentions("@all hi", ""));
    }
}
