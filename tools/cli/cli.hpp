// Command-line parsing for Chorus's programs (chorusrun, chorus-store,
// chorus-bench, the comparison benches, the engine bench, the trainer).
//
// A thin facade over CLI11 (Debian's libcli11-dev). CLI11 2.1 is header-only
// and costs about 13 s of compile per translation unit that includes it, at
// -O3 and again under the sanitizers; behind this header it is compiled once,
// in cli.cpp. The options, help text, validation and error messages are
// CLI11's own.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace CLI {
class App;
class Option;
}  // namespace CLI

namespace chorus::cli {

// One option of a Parser; cheap to copy, valid as long as its Parser.
class Option {
 public:
  Option& required();                   // parsing fails without it
  Option& show_default();               // "[default]" in --help: the variable's value when added
  Option& range(double lo, double hi);  // lo <= value <= hi
  Option& positive();                   // value > 0
  Option& non_negative();               // value >= 0
  Option& one_of(std::initializer_list<const char*> choices);
  Option& excludes(Option other);  // giving both is an error
  // A list option takes one value per use (-x A -x B); by default a list
  // option also takes the words after it (--coll a b).
  Option& one_value_per_use();
  // How many times it was given on the command line.
  std::size_t count() const;

 private:
  friend class Parser;
  explicit Option(CLI::Option* o) : o_(o) {}
  CLI::Option* o_;
};

class Parser {
 public:
  // `name` is the program's name in --help (default: argv[0]).
  explicit Parser(const std::string& description, const std::string& name = "");
  ~Parser();
  Parser(const Parser&) = delete;
  Parser& operator=(const Parser&) = delete;

  // names: "-n,--np" (CLI11's syntax; "--x,!--no-x" for a negatable flag).
  // T is one of: int, long, unsigned long, unsigned long long, std::uint16_t,
  // double, std::string, std::vector<std::string>.
  template <class T>
  Option add(const std::string& names, T& target, const std::string& help);
  Option flag(const std::string& names, bool& target, const std::string& help);
  // The option by one of its names (as given to add or flag).
  Option get(const std::string& name) const;

  void footer(const std::string& text);
  // Replaces the generated "Usage: ..." line of --help.
  void usage(const std::string& line);
  // Everything from the first positional argument on is left, unparsed,
  // for remaining() (a launcher's program and its arguments).
  void stop_at_first_positional();

  // Parses; returns nothing to go on, or the exit status the program should
  // end with: 0 after --help, non-zero for a parse or validation error. With
  // `report` (the default) the help or the error is printed (help to stdout,
  // errors to stderr); a program whose ranks all parse the same line reports
  // on one rank only.
  std::optional<int> parse(int argc, char** argv, bool report = true);
  std::optional<int> parse(const std::vector<std::string>& args, bool report = true);
  // Arguments left over by stop_at_first_positional(), in order.
  std::vector<std::string> remaining() const;

 private:
  std::optional<int> run(const std::vector<std::string>* args, int argc, char** argv, bool report);
  std::unique_ptr<CLI::App> app_;
};

}  // namespace chorus::cli
