# Builds and installs flexnbd:
#
#     make                                  # cargo build --release --bins
#     sudo make install                     # into PREFIX (/usr/local)
#     make install DESTDIR=/tmp/pkg PREFIX=/usr   # staged, for a package
#     sudo make uninstall                   # the same PREFIX and DESTDIR as install
#     make man                              # regenerate man/flexnbd.1 from the help texts
#
# Installed: the binaries (flexnbd, and flexnbd-proxy when it is built) in BINDIR, stripped
# by the release profile (Cargo.toml); the manual pages in MANDIR/man1; the systemd units of
# contrib/systemd/ in SYSTEMDUNITDIR, which is PREFIX/lib/systemd/system so that it is on
# systemd's search path for both /usr (a package) and /usr/local (by hand), with their
# /usr/local/bin/ rewritten to BINDIR; the example
# environment files and docs/ in DOCDIR. The build honours CARGO_TARGET_DIR.

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/flexnbd
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system

CARGO ?= cargo
INSTALL ?= install
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

BINS := flexnbd flexnbd-proxy
MANPAGES := $(wildcard man/*.1)
UNITS := $(wildcard contrib/systemd/*.service)
ENV_EXAMPLES := $(wildcard contrib/systemd/*.env.example)
DOCS := $(wildcard docs/*.md)

.PHONY: all build install uninstall man

all: build

# `sudo make install` often finds no cargo (rustup installs it per user): then the binaries
# `make` built are installed as they are.
build:
	@if command -v $(CARGO) >/dev/null 2>&1; then \
	    echo "$(CARGO) build --release --bins"; $(CARGO) build --release --bins; \
	elif [ -f $(TARGET_DIR)/release/flexnbd ]; then \
	    echo "$(CARGO) not found: installing the binaries built before in $(TARGET_DIR)/release"; \
	else \
	    echo "$(CARGO) not found: run make as the user with the Rust toolchain first" >&2; exit 1; \
	fi

install: build
	$(INSTALL) -d $(DESTDIR)$(BINDIR)
	@for bin in $(BINS); do \
	    if [ -f $(TARGET_DIR)/release/$$bin ]; then \
	        echo "$(INSTALL) -m 755 $(TARGET_DIR)/release/$$bin $(DESTDIR)$(BINDIR)/"; \
	        $(INSTALL) -m 755 $(TARGET_DIR)/release/$$bin $(DESTDIR)$(BINDIR)/ || exit 1; \
	    fi; \
	done
ifneq ($(MANPAGES),)
	$(INSTALL) -d $(DESTDIR)$(MANDIR)/man1
	$(INSTALL) -m 644 $(MANPAGES) $(DESTDIR)$(MANDIR)/man1/
endif
ifneq ($(UNITS),)
	$(INSTALL) -d $(DESTDIR)$(SYSTEMDUNITDIR)
	@# The units run /usr/local/bin/flexnbd: point them at BINDIR.
	@for unit in $(UNITS); do \
	    echo "sed 's|/usr/local/bin/|$(BINDIR)/|g' $$unit > $(DESTDIR)$(SYSTEMDUNITDIR)/$${unit##*/}"; \
	    sed 's|/usr/local/bin/|$(BINDIR)/|g' $$unit > $(DESTDIR)$(SYSTEMDUNITDIR)/$${unit##*/} && \
	        chmod 644 $(DESTDIR)$(SYSTEMDUNITDIR)/$${unit##*/} || exit 1; \
	done
endif
	$(INSTALL) -d $(DESTDIR)$(DOCDIR)
	$(INSTALL) -m 644 README.md $(DOCS) $(ENV_EXAMPLES) $(DESTDIR)$(DOCDIR)/

uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(BINS))
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man1/,$(notdir $(MANPAGES)))
	rm -f $(addprefix $(DESTDIR)$(SYSTEMDUNITDIR)/,$(notdir $(UNITS)))
	rm -rf $(DESTDIR)$(DOCDIR)

man:
	$(CARGO) run --quiet -- help --man > man/flexnbd.1.new
	mv man/flexnbd.1.new man/flexnbd.1
	$(CARGO) run --quiet -- help --man flexnbd-proxy > man/flexnbd-proxy.1.new
	mv man/flexnbd-proxy.1.new man/flexnbd-proxy.1
